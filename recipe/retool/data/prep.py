"""Turn the public datasets into the parquet files verl trains and validates on.

Writes, under ``--out-dir``:

* ``sft/train.parquet``: ReTool-SFT as ``messages`` + ``tools`` (verl ``MultiTurnSFTDataset``);
* ``rl/train.parquet``: DAPO-Math-17k, exact duplicate prompts removed (verl ``RLHFDataset``);
* ``rl/aime_2024.parquet``, ``rl/aime_2025.parquet``: validation sets in the same RL schema;
* ``prep_summary.json``: the per-dataset summary that is also printed; the SFT entry records
  the token limit its traces were filtered at (``sft_max_length``, null when no tokenizer was
  there to count tokens), which the pipeline reads to know whether prep must run again.

Files are written to a temporary name and renamed, so a crash never leaves a half-written file
that a later training run would read; the output is deterministic, so re-running is idempotent.

Run: ``python -m recipe.retool.data.prep --out-dir runs/data`` (hub; honours ``HF_TOKEN``) or
``python -m recipe.retool.data.prep --out-dir runs/data --source-dir DIR`` (local parquet laid out
as ``DIR/<hub id>/**/*.parquet``, e.g. what ``recipe.retool.local.samples.write_sources`` writes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from recipe.retool.core.constants import (
    AIME_2024_DATASET,
    AIME_2025_DATASET,
    RL_DATASET,
    SFT_DATASET,
    TOOL_NAME,
    TOOL_SCHEMA,
)
from recipe.retool.data.convert import (
    MalformedRow,
    map_aime_2024_row,
    map_aime_2025_row,
    map_dapo_row,
    map_sft_row,
)

OnError = Literal["fail", "skip"]
Overlong = Literal["drop", "fail", "keep"]
Group = Literal["sft", "rl", "val"]
MAX_ERRORS_KEPT = 20  # the summary lists this many malformed rows; the count covers all of them
SUMMARY_FILE = "prep_summary.json"


class PrepError(ValueError):
    """A mistake in prep's inputs (paths, options); the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Output schemas: explicit, so every file of a kind has the same schema (verl concatenates val
# files) and rows without an optional field (e.g. `tool_calls`) still round-trip.
# ---------------------------------------------------------------------------------------------

_TOOL_CALL = pa.struct(
    [
        ("type", pa.string()),
        (
            "function",
            pa.struct([("name", pa.string()), ("arguments", pa.struct([("code", pa.string())]))]),
        ),
    ]
)
_MESSAGE = pa.struct(
    [("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(_TOOL_CALL))]
)
_TOOL_SCHEMA_TYPE = pa.struct(
    [
        ("type", pa.string()),
        (
            "function",
            pa.struct(
                [
                    ("name", pa.string()),
                    ("description", pa.string()),
                    (
                        "parameters",
                        pa.struct(
                            [
                                ("type", pa.string()),
                                (
                                    "properties",
                                    pa.struct(
                                        [
                                            (
                                                "code",
                                                pa.struct(
                                                    [
                                                        ("type", pa.string()),
                                                        ("description", pa.string()),
                                                    ]
                                                ),
                                            )
                                        ]
                                    ),
                                ),
                                ("required", pa.list_(pa.string())),
                            ]
                        ),
                    ),
                ]
            ),
        ),
    ]
)
SFT_SCHEMA = pa.schema([("messages", pa.list_(_MESSAGE)), ("tools", pa.list_(_TOOL_SCHEMA_TYPE))])

RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("index", pa.int64()),
                    ("split", pa.string()),
                    ("source_id", pa.string()),
                    ("need_tools_kwargs", pa.bool_()),
                    (
                        "tools_kwargs",
                        pa.struct(
                            [
                                (
                                    TOOL_NAME,
                                    pa.struct(
                                        [
                                            (
                                                "create_kwargs",
                                                pa.struct([("ground_truth", pa.string())]),
                                            )
                                        ]
                                    ),
                                )
                            ]
                        ),
                    ),
                ]
            ),
        ),
        ("agent_name", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One output file: where its rows come from and how each row is mapped."""

    name: str
    group: Group
    hub_id: str
    split: str
    out: str  # path relative to --out-dir
    mapper: Callable[[dict[str, Any], int], dict[str, Any]]
    schema: pa.Schema
    dedupe: bool = False


SOURCES: tuple[Source, ...] = (
    Source("sft", "sft", SFT_DATASET, "train", "sft/train.parquet", map_sft_row, SFT_SCHEMA),
    Source("rl_train", "rl", RL_DATASET, "train", "rl/train.parquet", map_dapo_row, RL_SCHEMA,
           dedupe=True),
    Source("aime_2024", "val", AIME_2024_DATASET, "train", "rl/aime_2024.parquet",
           map_aime_2024_row, RL_SCHEMA),
    Source("aime_2025", "val", AIME_2025_DATASET, "train", "rl/aime_2025.parquet",
           map_aime_2025_row, RL_SCHEMA),
)  # fmt: skip


def load_source(source: Source, source_dir: Path | None) -> pa.Table:
    """The source as an Arrow table: from ``source_dir/<hub id>/**/*.parquet`` or from the hub.

    The hub path is the real one (``datasets.load_dataset``); ``HF_TOKEN`` is passed when set and
    omitted otherwise, since all four datasets are public.
    """
    if source_dir is not None:
        root = source_dir / source.hub_id
        files = sorted(root.rglob("*.parquet"))
        if not files:
            raise PrepError(
                f"no parquet files for {source.hub_id} under {root}: --source-dir needs "
                "<dir>/<hub id>/**/*.parquet (or omit it to download from the hub)"
            )
        return pa.concat_tables([pq.read_table(f) for f in files])
    import datasets

    token = os.environ.get("HF_TOKEN") or None
    ds = datasets.load_dataset(source.hub_id, split=source.split, token=token)
    return ds.with_format("arrow")[:]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepSummary:
    """What happened to one dataset; printed, written to ``prep_summary.json``, and returned."""

    name: str
    source: str
    path: str
    rows_in: int = 0
    rows_out: int = 0
    skipped: int = 0
    duplicates_dropped: int = 0
    conflicting_duplicates: int = 0  # same prompt, different ground truth (first one kept)
    overlong: int = 0  # over --sft-max-length tokens (dropped unless --overlong keep)
    sft_max_length: int | None = None  # SFT only: the limit rows were checked at (None: unchecked)
    tokenizer: str | None = None  # what counted the tokens (a path or hub id), when known
    errors: list[str] = field(default_factory=list)
    token_lengths: dict[str, int] | None = None

    def format(self) -> str:
        """One human-readable block for the console."""
        lines = [
            f"[{self.name}] {self.source} -> {self.path}",
            f"  rows in {self.rows_in}, out {self.rows_out}, skipped {self.skipped}, "
            f"duplicates dropped {self.duplicates_dropped} "
            f"(conflicting answers {self.conflicting_duplicates}), overlong {self.overlong}",
        ]
        if self.token_lengths:
            stats = ", ".join(f"{k} {v}" for k, v in self.token_lengths.items())
            lines.append(f"  tokens: {stats}")
        lines += [f"  malformed: {e}" for e in self.errors]
        return "\n".join(lines)


def length_stats(lengths: Sequence[int]) -> dict[str, int] | None:
    """p50/p90/p99/max of token lengths (None when there are none)."""
    if not lengths:
        return None
    arr = np.asarray(lengths)
    stats = {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 99)}
    stats["max"] = int(arr.max())
    return stats


def token_length(tokenizer: Any, row: dict[str, Any], group: Group) -> int:
    """Tokens verl sees: the whole SFT conversation, or the RL prompt the agent loop builds."""
    if group == "sft":
        enc = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=True)
    else:
        enc = tokenizer.apply_chat_template(
            row["prompt"], tools=[TOOL_SCHEMA], add_generation_prompt=True, tokenize=True
        )
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return len(ids)


# ---------------------------------------------------------------------------------------------
# The work
# ---------------------------------------------------------------------------------------------


DEDUPE_COLUMNS = ("prompt", "reward_model")  # what _dedupe reads, column-wise
PROGRESS_EVERY_S = 30.0
T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, every_s: float = PROGRESS_EVERY_S,
             stream: TextIO | None = None) -> Iterator[T]:  # fmt: skip
    """``items``, showing progress on ``stream`` (stderr): tqdm's bar on a terminal, else (Modal's
    logs, CI) one line every ``every_s`` seconds and one at the end, which a log keeps readable."""
    stream = stream or sys.stderr
    if stream.isatty():
        yield from tqdm(items, total=total, desc=desc, file=stream)
        return
    started = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            print(f"{desc}: {done}/{total} rows ({now - started:.0f} s)", file=stream, flush=True)


def _dedupe(table: pa.Table, summary: PrepSummary) -> list[int]:
    """Indices of each distinct prompt's first occurrence (malformed prompts kept, to be reported).

    Vectorised over Arrow/numpy: DAPO-Math-17k has 1.79 M rows, ~100 copies of each of 17.4 k
    prompts, so duplicates are found without materialising 1.79 M Python strings and only the
    survivors go through the Python row mapping.
    """
    missing = [name for name in DEDUPE_COLUMNS if name not in table.column_names]
    if missing:
        raise PrepError(
            f"{summary.name}: {summary.source} has no {' or '.join(missing)} column (it has "
            f"{', '.join(table.column_names)}); is it DAPO-Math-17k?"
        )
    prompts = table.column("prompt").combine_chunks()
    offsets = prompts.offsets.to_numpy()
    valid = prompts.is_valid().to_numpy(zero_copy_only=False)
    well_formed = valid & (np.diff(offsets) == 1)
    rows = np.flatnonzero(well_formed)
    contents = pc.fill_null(prompts.values.field("content").take(pa.array(offsets[rows])), "")
    codes = pc.dictionary_encode(contents).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    is_first = np.zeros(len(rows), dtype=bool)
    is_first[first] = True

    truths = (
        table.column("reward_model").combine_chunks().field("ground_truth").take(pa.array(rows))
    )
    truth_codes = pc.dictionary_encode(truths).indices.to_numpy(zero_copy_only=False)
    first_of_code = np.empty(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
    first_of_code[codes[first]] = first
    dup = ~is_first
    summary.duplicates_dropped += int(dup.sum())
    conflicts = truth_codes[dup] != truth_codes[first_of_code[codes[dup]]]
    summary.conflicting_duplicates += int(conflicts.sum())

    keep = np.ones(len(table), dtype=bool)
    keep[rows[dup]] = False
    return np.flatnonzero(keep).tolist()


def _write_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write parquet to a temporary sibling and rename it into place (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_one(
    source: Source,
    out_dir: Path,
    *,
    source_dir: Path | None = None,
    max_rows: int | None = None,
    on_error: OnError = "fail",
    tokenizer: Any = None,
    sft_max_length: int | None = None,
    overlong: Overlong = "drop",
) -> PrepSummary:
    """Load, map, dedupe, measure and write one dataset."""
    path = out_dir / source.out
    summary = PrepSummary(source.name, source.hub_id, str(path))
    table = load_source(source, source_dir)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    summary.rows_in = len(table)
    indices = _dedupe(table, summary) if source.dedupe else list(range(len(table)))
    source_rows = table.take(indices).to_pylist() if source.dedupe else table.to_pylist()

    out_rows: list[dict[str, Any]] = []
    lengths: list[int] = []
    rows = zip(indices, source_rows, strict=True)
    for index, row in progress(rows, len(indices), source.name):
        try:
            mapped = source.mapper(row, index)
        except MalformedRow as err:
            if on_error == "fail":
                raise MalformedRow(err.index, f"{source.name}: {err.reason}") from None
            summary.skipped += 1
            if len(summary.errors) < MAX_ERRORS_KEPT:
                summary.errors.append(str(err))
            continue
        if tokenizer is not None:
            n_tokens = token_length(tokenizer, mapped, source.group)
            if source.group == "sft" and sft_max_length is not None and n_tokens > sft_max_length:
                summary.overlong += 1
                if overlong == "fail":
                    reason = f"{source.name}: {n_tokens} tokens > sft_max_length {sft_max_length}"
                    raise MalformedRow(index, reason)
                if overlong == "drop":
                    continue
            lengths.append(n_tokens)
        out_rows.append(mapped)

    if not out_rows:
        raise PrepError(
            f"{source.name}: no rows left of {summary.rows_in} read "
            f"({summary.skipped} malformed, {summary.overlong} overlong); {path} not written"
        )
    summary.rows_out = len(out_rows)
    summary.token_lengths = length_stats(lengths)
    if tokenizer is not None:
        summary.tokenizer = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if source.group == "sft":
            summary.sft_max_length = sft_max_length
    _write_atomic(out_rows, source.schema, path)
    return summary


def prepare(
    out_dir: Path,
    *,
    only: Sequence[Group] | None = None,
    source_dir: Path | None = None,
    max_rows: int | None = None,
    on_error: OnError = "fail",
    tokenizer: Any = None,
    sft_max_length: int | None = None,
    overlong: Overlong = "drop",
    show: bool = True,
) -> dict[str, PrepSummary]:
    """Prepare the selected groups (default: all) and return one summary per output file.

    ``tokenizer`` is a tokenizer object or a path to one; without it there are no token stats and
    ``sft_max_length`` cannot be enforced (that combination is an error, not a silent no-op).
    """
    if sft_max_length is not None and tokenizer is None:
        raise PrepError("sft_max_length needs a tokenizer to count tokens: pass --tokenizer too")
    unknown = set(only or ()) - {"sft", "rl", "val"}
    if unknown or on_error not in ("fail", "skip"):
        raise PrepError(
            f"only={sorted(unknown)} on_error={on_error!r}: groups are sft, rl, val; "
            "on_error is fail or skip"
        )
    if max_rows is not None and max_rows < 1:
        raise PrepError(f"max_rows={max_rows}: read at least 1 row (omit it to read every row)")
    if source_dir is not None and not source_dir.is_dir():
        raise PrepError(f"--source-dir {source_dir} is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, or no permission
        raise PrepError(f"--out-dir {out_dir} cannot be a directory: {exc.strerror}") from None
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    groups = set(only or ("sft", "rl", "val"))
    summaries: dict[str, PrepSummary] = {}
    for source in SOURCES:
        if source.group not in groups:
            continue
        summary = prepare_one(
            source,
            out_dir,
            source_dir=source_dir,
            max_rows=max_rows,
            on_error=on_error,
            tokenizer=tokenizer,
            sft_max_length=sft_max_length,
            overlong=overlong,
        )
        summaries[source.name] = summary
        if show:
            print(summary.format(), flush=True)
    report = out_dir / SUMMARY_FILE
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in summaries.items()}, indent=2) + "\n")
    tmp.replace(report)
    return summaries


def sft_length_checked(out_dir: Path) -> int | None:
    """The token limit the last prep in ``out_dir`` filtered SFT traces at, from its summary;
    ``None`` when it did not (no tokenizer, no SFT entry, no or unreadable summary)."""
    try:
        return json.loads((out_dir / SUMMARY_FILE).read_text())["sft"]["sft_max_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tokenizer(name: str | Path) -> Any:
    """A tokenizer from a directory or a hub id; a :class:`PrepError` when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrepError(
            f"cannot load a tokenizer from {str(name)!r} ({first}); pass a model directory "
            "or hub id, or omit --tokenizer"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipe.retool.data.prep",
        description="Convert ReTool-SFT, DAPO-Math-17k and AIME 2024/2025 into verl parquet files.",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="where to write sft/ and rl/")
    parser.add_argument(
        "--only",
        choices=["sft", "rl", "val"],
        action="append",
        help="prepare only this group (repeatable; default: all)",
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="read only the first N source rows of each set"
    )
    parser.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="a malformed row stops the run (fail) or is skipped and counted (skip)",
    )
    parser.add_argument(
        "--tokenizer", type=str, default=None, help="tokenizer dir/id for token-length statistics"
    )
    parser.add_argument(
        "--sft-max-length",
        type=int,
        default=None,
        help="SFT conversations longer than this many tokens are handled per --overlong "
        "(verl's default truncation=error would crash mid-epoch on them)",
    )
    parser.add_argument(
        "--overlong",
        choices=["drop", "fail", "keep"],
        default="drop",
        help="what to do with SFT rows over --sft-max-length (always counted)",
    )
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help="read <dir>/<hub id>/**/*.parquet instead of the Hugging Face hub",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(
            args.out_dir,
            only=args.only,
            source_dir=args.source_dir,
            max_rows=args.max_rows,
            on_error=args.on_error,
            tokenizer=args.tokenizer,
            sft_max_length=args.sft_max_length,
            overlong=args.overlong,
        )
    except MalformedRow as err:
        print(
            f"error: malformed {err} (use --on-error skip to skip and count such rows)",
            file=sys.stderr,
        )
        return 2
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

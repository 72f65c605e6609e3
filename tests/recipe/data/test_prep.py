"""prep end to end on fixtures in the sources' exact schemas: files, counts, errors, idempotence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipe.retool.core.constants import ANSWER_FORMAT, TOOL_SCHEMA
from recipe.retool.data import prep
from recipe.retool.data.convert import MalformedRow
from recipe.retool.local.samples import (
    DAPO_PROBLEMS,
    NO_TOOL_TRACE,
    RETOOL_ROWS,
    dapo_prompt,
    dapo_table,
    retool_table,
    write_sources,
)
from tests.cli import assert_one_line_error

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    return write_sources(tmp_path / "src")


def test_skip_mode_writes_all_files_and_counts_everything(sources: Path, tmp_path: Path):
    out = tmp_path / "out"
    summaries = prep.prepare(out, source_dir=sources, on_error="skip", show=False)
    assert set(summaries) == {"sft", "rl_train", "aime_2024", "aime_2025"}

    sft = summaries["sft"]
    assert (sft.rows_in, sft.rows_out, sft.skipped) == (6, 2, 4)
    assert [e.split(":")[0] for e in sft.errors] == ["row 2", "row 3", "row 4", "row 5"]

    rl = summaries["rl_train"]
    assert rl.rows_in == 3 * len(DAPO_PROBLEMS)
    assert rl.duplicates_dropped == 2 * len(DAPO_PROBLEMS)
    assert (rl.rows_out, rl.skipped, rl.conflicting_duplicates) == (len(DAPO_PROBLEMS), 0, 0)

    for name in ("aime_2024", "aime_2025"):
        assert (summaries[name].rows_in, summaries[name].rows_out) == (2, 2)

    sft_rows = pq.read_table(out / "sft/train.parquet").to_pylist()
    assert [m["role"] for m in sft_rows[0]["messages"]] == [
        "user", "assistant", "tool", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert sft_rows[1]["messages"][-1]["tool_calls"] is None
    assert sft_rows[0]["tools"] == [TOOL_SCHEMA]

    train = pq.read_table(out / "rl/train.parquet").to_pylist()
    assert [r["prompt"][0]["content"] for r in train] == [
        p + ANSWER_FORMAT for p, _ in DAPO_PROBLEMS
    ]
    assert [r["reward_model"]["ground_truth"] for r in train] == [a for _, a in DAPO_PROBLEMS]
    assert [r["extra_info"]["index"] for r in train] == [0, 1, 2]  # first occurrences kept

    report = json.loads((out / "prep_summary.json").read_text())
    assert report["rl_train"]["duplicates_dropped"] == 6


def test_all_rl_files_share_one_schema_so_verl_can_concatenate_them(sources: Path, tmp_path):
    out = tmp_path / "out"
    prep.prepare(out, source_dir=sources, only=["rl", "val"], show=False)
    schemas = [pq.read_schema(out / f"rl/{n}.parquet") for n in ("train", "aime_2024", "aime_2025")]
    assert schemas[0].equals(schemas[1]) and schemas[0].equals(schemas[2])
    import datasets

    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(out / "rl/aime_2024.parquet"), str(out / "rl/aime_2025.parquet")],
        split="train",
    )
    assert len(ds) == 4
    assert ds[0]["extra_info"]["tools_kwargs"]["code_interpreter"]["create_kwargs"] == {
        "ground_truth": "25"
    }


def test_fail_mode_stops_at_first_malformed_row_and_names_it(sources: Path, tmp_path: Path):
    with pytest.raises(MalformedRow, match=r"row 2: sft: .*not followed by <interpreter>"):
        prep.prepare(tmp_path / "out", source_dir=sources, only=["sft"], show=False)
    assert not (tmp_path / "out/sft/train.parquet").exists()


def test_conflicting_duplicates_are_counted(tmp_path: Path):
    problem, answer = DAPO_PROBLEMS[0]
    clash = {
        "data_source": "math_dapo",
        "prompt": [{"content": dapo_prompt(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer + "0", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "clash"},
    }
    bad = {**clash, "prompt": [], "extra_info": {"index": "bad"}}
    src = write_sources(tmp_path / "src", dapo=dapo_table(copies=1, extra=[clash, bad]))
    (s,) = prep.prepare(
        tmp_path / "out", source_dir=src, only=["rl"], on_error="skip", show=False
    ).values()
    assert (s.rows_in, s.rows_out, s.duplicates_dropped, s.conflicting_duplicates, s.skipped) == (
        len(DAPO_PROBLEMS) + 2, len(DAPO_PROBLEMS), 1, 1, 1,
    )  # fmt: skip


def test_rerun_is_idempotent_and_leaves_no_temp_files(sources: Path, tmp_path: Path):
    out = tmp_path / "out"
    prep.prepare(out, source_dir=sources, on_error="skip", show=False)
    first = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    prep.prepare(out, source_dir=sources, on_error="skip", show=False)
    second = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    assert first == second and len(first) == 4
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_max_rows_limits_rows_read(sources: Path, tmp_path: Path):
    s = prep.prepare(tmp_path / "out", source_dir=sources, only=["rl"], max_rows=4, show=False)[
        "rl_train"
    ]
    assert (s.rows_in, s.rows_out, s.duplicates_dropped) == (4, 3, 1)


def test_token_stats_and_overlong_sft_rows(sources: Path, tmp_path: Path, tiny_tokenizer):
    table = retool_table([("What is 2 + 2?", NO_TOOL_TRACE), ("Long " * 400, NO_TOOL_TRACE)])
    src = write_sources(tmp_path / "src2", retool=table)
    s = prep.prepare(
        tmp_path / "out", source_dir=src, only=["sft"], tokenizer=tiny_tokenizer, show=False
    )["sft"]
    short, long = s.token_lengths["p50"], s.token_lengths["max"]
    assert 0 < short < long

    limit = (short + long) // 2
    kwargs = dict(source_dir=src, only=["sft"], tokenizer=tiny_tokenizer, show=False)
    dropped = prep.prepare(tmp_path / "o2", sft_max_length=limit, **kwargs)["sft"]
    assert (dropped.rows_out, dropped.overlong) == (1, 1)
    assert dropped.token_lengths["max"] <= limit
    kept = prep.prepare(tmp_path / "o3", sft_max_length=limit, overlong="keep", **kwargs)["sft"]
    assert (kept.rows_out, kept.overlong) == (2, 1)
    with pytest.raises(MalformedRow, match=r"row 1: sft: .* tokens > sft_max_length"):
        prep.prepare(tmp_path / "o4", sft_max_length=limit, overlong="fail", **kwargs)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prep.prepare(tmp_path / "o5", source_dir=src, sft_max_length=10, show=False)


def test_rl_token_stats_count_the_prompt_with_tool_system_block(sources, tmp_path, tiny_tokenizer):
    s = prep.prepare(
        tmp_path / "out", source_dir=sources, only=["val"], tokenizer=tiny_tokenizer, show=False
    )["aime_2024"]
    row = pq.read_table(tmp_path / "out/rl/aime_2024.parquet").to_pylist()[0]
    text = tiny_tokenizer.apply_chat_template(
        row["prompt"], tools=[TOOL_SCHEMA], add_generation_prompt=True, tokenize=False
    )
    assert "code_interpreter" in text
    assert s.token_lengths["max"] >= len(tiny_tokenizer(text, add_special_tokens=False).input_ids)


def test_cli_help_documents_options_and_cli_runs(sources: Path, tmp_path: Path):
    helptext = subprocess.run(
        [sys.executable, "-m", "recipe.retool.data.prep", "--help"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for opt in ("--out-dir", "--only", "--max-rows", "--on-error", "--tokenizer", "--source-dir"):
        assert opt in helptext
    run = subprocess.run(
        [sys.executable, "-m", "recipe.retool.data.prep", "--out-dir", str(tmp_path / "o"),
         "--source-dir", str(sources), "--only", "val"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "[aime_2024]" in run.stdout and "rows in 2, out 2" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "recipe.retool.data.prep", "--out-dir", str(tmp_path / "o"),
         "--source-dir", str(sources), "--only", "sft"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert_one_line_error(bad, "row 2")


def test_hub_loading_passes_token_only_when_set(monkeypatch):
    import datasets

    seen = {}

    def fake_load(hub_id, split, token):
        seen.update(hub_id=hub_id, split=split, token=token)
        return datasets.Dataset.from_dict({"x": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    table = prep.load_source(prep.SOURCES[0], None)
    assert isinstance(table, pa.Table) and table.num_rows == 1
    assert seen == {"hub_id": "JoeYing/ReTool-SFT", "split": "train", "token": None}
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    prep.load_source(prep.SOURCES[0], None)
    assert seen["token"] == "hf_x"


def test_a_set_with_no_rows_left_is_an_error_not_an_empty_file(tmp_path: Path):
    src = write_sources(tmp_path / "src", retool=retool_table(RETOOL_ROWS[2:4]))
    with pytest.raises(prep.PrepError, match=r"sft: no rows left of 2 read \(2 malformed"):
        prep.prepare(tmp_path / "out", source_dir=src, only=["sft"], on_error="skip", show=False)
    assert not (tmp_path / "out" / "sft" / "train.parquet").exists()


def test_progress_without_a_terminal_is_periodic_lines(monkeypatch) -> None:
    import io

    from recipe.retool.data import prep

    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(prep.time, "monotonic", lambda: next(clock))
    log = io.StringIO()  # not a tty, as in Modal's logs
    assert list(prep.progress(range(5), 5, "sft", every_s=2, stream=log)) == list(range(5))
    assert log.getvalue().splitlines() == [
        "sft: 2/5 rows (2 s)", "sft: 4/5 rows (4 s)", "sft: 5/5 rows (5 s)",
    ]  # fmt: skip

"""Every known user mistake at every command line: one ``error:`` line on stderr, exit 2, no
traceback, run as a user runs it (``python -m ...``). A new mistake found is a new row here.

Placeholders in the arguments name inputs made once per module (``{model}``, ``{data}``,
``{sources}``, ...) or in the test's own directory (``{tmp}``: outputs, so a case that must
write nothing can be checked to have written nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recipe.retool.data import prep
from recipe.retool.local.samples import dapo_table, write_sources
from tests.cli import assert_one_line_error, run_module
from tests.recipe.test_paths import write_weights


@dataclass(frozen=True)
class Mistake:
    module: str
    args: tuple[str, ...]
    message: str  # in the one error line
    env: dict[str, str] = field(default_factory=dict)


def launch(*args: str) -> tuple[str, tuple[str, ...]]:
    return "recipe.retool.launch", ("check", *args)


def prep_cli(*args: str) -> tuple[str, tuple[str, ...]]:
    """Prep from the fixture sources into ``{tmp}/out`` unless the case names its own."""
    source = () if "--source-dir" in args else ("--source-dir", "{sources}")
    out = () if "--out-dir" in args else ("--out-dir", "{tmp}/out")
    return "recipe.retool.data.prep", (*out, *source, *args)


def evaluate(*args: str) -> tuple[str, tuple[str, ...]]:
    """An evaluation of a model whose weights load, on prepared data, unless the case says."""
    given = {a for a in args if a.startswith("--")}
    base = [("--checkpoint", "{model}"), ("--data-dir", "{data}"), ("--out-dir", "{tmp}/o")]
    defaults = [x for pair in base if pair[0] not in given for x in pair]
    return "recipe.retool.eval", (*defaults, *args)


def report(*args: str) -> tuple[str, tuple[str, ...]]:
    return "recipe.retool.eval", args


def sandbox(*args: str) -> tuple[str, tuple[str, ...]]:
    code = ("--code", "print(1)") if args[0] == "run" else ()
    return "sandbox", (*args, *code)


def case(cli: tuple[str, tuple[str, ...]], message: str, **env: str) -> Mistake:
    return Mistake(cli[0], cli[1], message, env)


MISTAKES = [
    # launch check (what `make sft` / `make dapo` run before Modal)
    case(launch("sft", "--gpus", "0"), "0 GPUs per node on 1 node(s): both must be >= 1"),
    case(launch("sft", "--nodes", "0"), "8 GPUs per node on 0 node(s): both must be >= 1"),
    case(launch("sft", "--gpus", "-2"), "-2 GPUs per node"),
    case(launch("sft", "--gpus", "two"), "argument --gpus: invalid int value: 'two'"),
    case(launch("sft", "--experiment-name=a/b"), "invalid experiment name 'a/b'"),
    case(launch("sft", "--experiment-name", ".hidden"), "invalid experiment name '.hidden'"),
    case(launch("sft", "--bogus=1"), "unknown option --bogus"),
    case(launch("sft", "epochs"), "cannot read argument 'epochs'"),
    case(launch("dapo", "--sandbox=cloud"), "--sandbox=cloud: choose node or deployed or modal"),
    case(launch("sft", "trainer.total_epoch=2"), "unknown key 'trainer.total_epoch'"),
    case(launch("sft", "trainer.total_epochs=two"), "trainer.total_epochs='two': expected a"),
    case(launch("sft", "trainer.total_epochs=-5"), "trainer.total_epochs=-5: must be >= 1"),
    case(launch("sft", "data.train_batch_size=0"), "data.train_batch_size=0: must be >= 1"),
    case(launch("dapo", "actor_rollout_ref.rollout.n=0"), "rollout.n=0: must be >= 1"),
    # prep
    case(prep_cli("--source-dir", "/nonexistent"), "--source-dir /nonexistent is not a directory"),
    case(prep_cli("--source-dir", "{empty}"), "no parquet files for JoeYing/ReTool-SFT under"),
    case(prep_cli("--sft-max-length", "100"), "sft_max_length needs a tokenizer"),
    case(prep_cli("--tokenizer", "/nonexistent"), "cannot load a tokenizer from '/nonexistent'"),
    case(prep_cli("--tokenizer", "{empty}"), "cannot load a tokenizer from"),
    case(prep_cli("--max-rows", "0"), "max_rows=0: read at least 1 row"),
    case(prep_cli("--max-rows", "-3"), "max_rows=-3"),
    case(prep_cli("--max-rows", "many"), "argument --max-rows: invalid int value"),
    case(prep_cli("--out-dir", "{file}"), "--out-dir {file} cannot be a directory"),
    case(prep_cli("--out-dir", "{file}/out"), "cannot be a directory: Not a directory"),
    case(prep_cli("--source-dir", "{no_reward}", "--only", "rl"), "has no reward_model column"),
    # the local smoke run
    case(("recipe.retool.local.smoke", ("--root", "{file}")), "--root {file} cannot be a dir"),
    # evaluation
    case(evaluate("--checkpoint", "{tmp}/nope"), "no checkpoint directory"),
    case(evaluate("--checkpoint", "{truncated}"), "model.safetensors: truncated"),
    case(evaluate("--checkpoint", "{config_only}"), "merge the checkpoint first"),
    case(evaluate("--datasets", "aime_2030"), "dataset 'aime_2030' not found"),
    case(evaluate("--datasets", ","), "no dataset named: pass --datasets"),
    case(evaluate("--datasets", " "), "no dataset named"),
    case(evaluate("--n", "0"), "n must be >= 1"),
    case(evaluate("bogus=1"), "unknown eval config keys"),
    case(evaluate("top_p"), "cannot read argument 'top_p': expected KEY=VALUE"),
    case(evaluate("top_p=["), "override 'top_p=[': the value is not YAML"),
    case(evaluate("n=abc"), "n='abc': expected an integer"),
    case(evaluate("n=1.5"), "n=1.5: expected an integer"),
    case(evaluate("save_samples=3"), "save_samples=3: expected true or false"),
    case(evaluate("tool_timeout_s=abc"), "tool_timeout_s='abc': expected a number or"),
    case(evaluate("tool_config=/no.yaml"), "tool_config /no.yaml is not a file"),
    case(evaluate("--n", "2", "n=0"), "n must be >= 1"),  # KEY=VALUE wins over the flag
    case(evaluate("--root", "{file}"), "--root {file} is not a directory"),
    case(evaluate("--root", "{tmp}/nowhere"), "--root {tmp}/nowhere is not a directory"),
    case(evaluate("--config", "{broken_yaml}"), "broken.yaml is not valid YAML at line 2"),
    case(evaluate("--config", "{list_yaml}"), "list.yaml must be a mapping of eval settings"),
    case(evaluate("--config", "{tmp}/none.yaml"), "none.yaml not found"),
    case(evaluate("--out-dir", "{reported}"), "already holds a report; pass --force"),
    case(evaluate("--out-dir", "{file}"), "--out-dir {file} is a file"),
    case(report("compare", "--result", "x={tmp}/no", "--out-dir", "{tmp}/c"), "no eval_<data"),
    case(report("compare", "--result", "nolabel", "--out-dir", "{tmp}/c"), "expects LABEL=DIR"),
    case(report("progress", "--eval-root", "{tmp}/no", "--out-dir", "{tmp}/p"), "not a direct"),
    case(report("progress", "--eval-root", "{empty}", "--out-dir", "{tmp}/p"), "no evaluated"),
    # the sandbox service
    case(sandbox("run", "--slots", "0"), "slots=0: at least 1 run must fit"),
    case(sandbox("serve", "--log-level", "loud"), "argument --log-level: invalid choice: 'loud'"),
    case(sandbox("serve", "--port", "99999"), "argument --port: invalid tcp_port value: '99999'"),
    case(sandbox("serve", "--port", "0"), "argument --port: invalid tcp_port value: '0'"),
    case(sandbox("run"), "SANDBOX_SLOTS='abc': expected an integer", SANDBOX_SLOTS="abc"),
    case(sandbox("run"), "SANDBOX_MAX_RUN_TIMEOUT_S='1m'", SANDBOX_MAX_RUN_TIMEOUT_S="1m"),
    case(sandbox("serve"), "'/nonexistent' is not an executable", SANDBOX_PYTHON="/nonexistent"),
    case(sandbox("run"), "set SANDBOX_PYTHON to an interpreter", SANDBOX_PYTHON="/nonexistent"),
    case(sandbox("serve", "--isolation", "bwrap"), "bwrap is not on PATH", PATH="/nonexistent"),
    case(
        sandbox("serve-pool", "--sandboxes", "0"), "serve-pool: sandboxes, slots and max_starting"
    ),
    case(sandbox("serve-pool", "--targets", "ray"), "self-test target 'ray': expected host:port"),
    case(sandbox("serve-pool", "--backend", "aws"), "argument --backend: invalid choice: 'aws'"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the placeholders name: made once, read by every case, written by none."""
    root = tmp_path_factory.mktemp("inputs")
    sources = write_sources(root / "src")
    no_reward = write_sources(root / "src-no-reward", dapo=dapo_table().drop(["reward_model"]))
    prep.prepare(root / "data", only=["val"], source_dir=sources, show=False)
    places = {
        "sources": sources,
        "no_reward": no_reward,
        "data": root / "data",
        "empty": root / "empty",
        "file": root / "a-file",
        "broken_yaml": root / "broken.yaml",
        "list_yaml": root / "list.yaml",
    }
    places["empty"].mkdir()
    places["file"].write_text("not a directory\n")
    places["broken_yaml"].write_text("n: 32\n  top_p: [\n")
    places["list_yaml"].write_text("- n\n")
    for name in ("model", "truncated", "config_only"):
        places[name] = root / name
        places[name].mkdir()
        (places[name] / "config.json").write_text("{}")
    write_weights(places["model"])
    whole = write_weights(places["truncated"]).read_bytes()
    (places["truncated"] / "model.safetensors").write_bytes(whole[:-8])
    places["reported"] = root / "reported"
    places["reported"].mkdir()
    (places["reported"] / "summary.json").write_text("{}")
    return places


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: f"{m.module} {' '.join(m.args)}")
def test_every_cli_mistake_is_one_line_and_exit_2(
    mistake: Mistake, inputs: dict[str, Path], tmp_path: Path
) -> None:
    places = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path)}
    args = [a.format(**places) for a in mistake.args]
    proc = run_module(mistake.module, *args, env=mistake.env)
    assert_one_line_error(proc, mistake.message.format(**places))
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("eval_*.json"))

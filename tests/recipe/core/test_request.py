"""The launch request: one parser (``parse``), and ``to_argv`` that it reads back unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recipe.retool.core.request import (
    ROLLOUT_MODES,
    SANDBOX_CHOICES,
    LaunchError,
    LaunchRequest,
    parse,
)


def test_parse_launch_args_splits_options_from_overrides() -> None:
    parsed = parse(
        "dapo",
        [
            "--experiment-name=my-exp",
            "--sft-checkpoint",
            "/ckpt",
            "--",
            "trainer.total_epochs=5",
            "+a.b=1",
        ],
    )
    assert parsed.experiment == "my-exp"
    assert parsed.sft_checkpoint == "/ckpt"
    assert parsed.overrides == ("trainer.total_epochs=5", "+a.b=1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs=3"], "unknown option --epochs"),
        (["--experiment-name"], "needs a value"),
        (["oops"], "expected key=value"),
    ],
)
def test_parse_launch_args_errors_are_one_line(args: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse("dapo", args)


# Values as a user could write them: any text for the free options (an experiment name that
# names one directory), overrides that read as overrides (``key=value``, ``~key``).
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_names = _text.filter(lambda n: n and "/" not in n and not n.startswith("."))
_keys = st.from_regex(r"[+~]{0,2}[a-z_][a-z0-9_.]{0,10}", fullmatch=True)
_overrides = st.one_of(
    st.tuples(_keys.filter(lambda k: not k.startswith("~")), _text).map("=".join),
    _keys.filter(lambda k: k.startswith("~") and not k.startswith("~~")),
)
requests = st.builds(
    LaunchRequest,
    stage=st.sampled_from(["sft", "dapo"]),
    experiment=st.none() | _names,
    sft_checkpoint=st.none() | _text,
    sandbox=st.none() | st.sampled_from(SANDBOX_CHOICES),
    rollout_mode=st.sampled_from(ROLLOUT_MODES),
    rollout_gpus=st.none() | st.integers(0, 64),
    allow_other_base=st.booleans(),
    overrides=st.lists(_overrides, max_size=4).map(tuple),
)


@given(requests)
def test_a_request_crosses_a_process_boundary_unchanged(request: LaunchRequest) -> None:
    assert parse(request.stage, request.to_argv()) == request


def test_to_argv_names_only_what_differs_from_the_defaults() -> None:
    request = LaunchRequest("dapo", experiment="rl", sft_checkpoint="sft-1", overrides=("a=1",))
    assert request.to_argv() == ["--experiment-name=rl", "--sft-checkpoint=sft-1", "a=1"]
    assert LaunchRequest("sft").to_argv() == []

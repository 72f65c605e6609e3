"""``python -m sandbox``: each user mistake is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import pytest

from sandbox.settings import Settings, SettingsError
from tests.cli import assert_one_line_error, run_module


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "--slots", "0"], {}, "slots=0: at least 1 run must fit"),
        (["serve", "--log-level", "loud"], {}, "argument --log-level: invalid choice: 'loud'"),
        (["serve", "--port", "99999"], {}, "argument --port: invalid tcp_port value: '99999'"),
        (["serve", "--port", "0"], {}, "argument --port: invalid tcp_port value: '0'"),
        (["run"], {"SANDBOX_SLOTS": "abc"}, "SANDBOX_SLOTS='abc': expected an integer"),
        (["run"], {"SANDBOX_MAX_RUN_TIMEOUT_S": "1m"}, "SANDBOX_MAX_RUN_TIMEOUT_S='1m'"),
        (["serve"], {"SANDBOX_PYTHON": "/nonexistent"}, "'/nonexistent' is not an executable"),
        (["run"], {"SANDBOX_PYTHON": "/nonexistent"}, "set SANDBOX_PYTHON to an interpreter"),
    ],
)
def test_cli_mistakes_are_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    code = ["--code", "print(1)"] if args[0] == "run" else []
    proc = run_module("sandbox", *args, *code, env=env)
    assert_one_line_error(proc, message)


def test_settings_reject_what_cannot_work() -> None:
    with pytest.raises(SettingsError, match="slots=-1"):
        Settings(slots=-1)
    assert Settings(slots=1, python="").slots == 1

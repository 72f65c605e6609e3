"""Sandbox settings; its CLI mistakes (one line, exit 2) are rows of tests/test_cli_mistakes.py."""

from __future__ import annotations

import pytest

from sandbox.settings import Settings, SettingsError


def test_settings_reject_what_cannot_work() -> None:
    with pytest.raises(SettingsError, match="slots=-1"):
        Settings(slots=-1)
    assert Settings(slots=1, python="").slots == 1

"""The project's ``.env`` (``.env.example`` says what goes in it), read with the standard library.

The Modal app files read it where ``modal run`` runs, and there a user may have nothing but
``pip install modal``: no python-dotenv (which ``modal.Secret.from_dotenv`` needs), so the file is
read here, the same way for the secrets a launch hands its containers and for a launch's own
checks (``tracking.launch_env``).
"""

from __future__ import annotations

from pathlib import Path

DOTENV = Path(__file__).resolve().parents[3] / ".env"  # at the repository root


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (comments, blanks and ``export`` tolerated, quotes
    around a value dropped); ``{}`` when there is none. Values are returned, never printed."""
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values

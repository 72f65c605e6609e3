"""Static file checks for pre-commit (offline: no hook repositories are fetched).

Usage: python scripts/check_files.py {yaml|toml|whitespace} FILE...
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import yaml


class _AnyTagLoader(yaml.SafeLoader):
    """Safe loader that accepts custom tags (compose's !reset etc.) without constructing them."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_yaml(path: Path) -> str | None:
    try:
        list(yaml.load_all(path.read_text(), Loader=_AnyTagLoader))
    except yaml.YAMLError as exc:
        return f"invalid YAML: {exc}"
    return None


def check_toml(path: Path) -> str | None:
    try:
        tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        return f"invalid TOML: {exc}"
    return None


def check_whitespace(path: Path) -> str | None:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line != line.rstrip():
            return f"line {number}: trailing whitespace"
    if text and not text.endswith("\n"):
        return "no newline at end of file"
    return None


CHECKS = {"yaml": check_yaml, "toml": check_toml, "whitespace": check_whitespace}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    check = CHECKS[argv[0]]
    failures = [(name, err) for name in argv[1:] if (err := check(Path(name)))]
    for name, err in failures:
        print(f"{name}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

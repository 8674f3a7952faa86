"""Run mypy (strict) on the package and the tests.

The import namespace ``centinela.*`` is assembled from top-level folders by setuptools'
``package-dir``; mypy cannot follow that mapping (nor an editable install's import hook), so
this script lays a tree of symbolic links under ``.typecheck/`` that mirrors the installed
layout and points mypy at it. Nothing is copied: errors name the real files' lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHADOW = ROOT / ".typecheck"


def build_shadow() -> Path:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = conf["tool"]["setuptools"]["package-dir"]
    root_pkg = SHADOW / "centinela"
    root_pkg.mkdir(parents=True, exist_ok=True)
    for entry in root_pkg.iterdir():
        if entry.is_symlink():
            entry.unlink()
    for src in (ROOT / mapping["centinela"]).iterdir():
        if src.suffix in {".py", ".pyi", ".typed"}:
            (root_pkg / src.name).symlink_to(src)
    for pkg, folder in mapping.items():
        if pkg == "centinela":
            continue
        (root_pkg / pkg.split(".", 1)[1]).symlink_to(ROOT / folder, target_is_directory=True)
    return SHADOW


def main(argv: list[str]) -> int:
    shadow = build_shadow()
    env = dict(os.environ, MYPYPATH=str(shadow))
    targets = argv or [str(shadow / "centinela"), "tests", "benchmarks", "scripts"]
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

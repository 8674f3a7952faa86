"""The package maps top-level folders into ``centinela.*`` and leaks no generic names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GENERIC = ("server", "clients", "policy", "matcher", "audit", "protos", "core")


def test_no_generic_top_level_names(tmp_path: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        f"leaks = [n for n in {GENERIC!r} if importlib.util.find_spec(n) is not None]\n"
        "print(','.join(leaks))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_components_import_under_one_namespace(tmp_path: Path) -> None:
    code = (
        "import centinela.server, centinela.clients, centinela.policy, centinela.matcher, "
        "centinela.audit, centinela.v1.common_pb2, centinela.errors, centinela.config\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"

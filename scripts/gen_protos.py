"""Generate the Python code of the wire contract from ``protos/``: one command.

    python scripts/gen_protos.py            # regenerate protos/centinela/v1/*_pb2*.py[i]
    python scripts/gen_protos.py --check    # exit 1 if the committed code is stale

Output goes beside the ``.proto`` files, which setuptools maps to the import path
``centinela.v1``. Stubs (``.pyi``) for messages and services come from mypy-protobuf.
The versions of grpcio-tools and mypy-protobuf are pinned in pyproject.toml so that the
output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PKG_DIR = PROTO_ROOT / "centinela" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (which mirrors ``protos/``); return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PKG_DIR.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    out_pkg = out_root / "centinela" / "v1"
    return sorted(p for p in out_pkg.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in PKG_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(set(fresh) ^ set(committed))
        for name in sorted(set(fresh) & set(committed)):
            if not filecmp.cmp(fresh[name], committed[name], shallow=False):
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale), file=sys.stderr)
            print("run: python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for p in PKG_DIR.iterdir():
        if p.name.endswith(GENERATED_SUFFIXES):
            p.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for p in generate(Path(tmp)):
            shutil.copyfile(p, PKG_DIR / p.name)
            print(f"wrote {(PKG_DIR / p.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

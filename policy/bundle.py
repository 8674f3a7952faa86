"""Policy bundles: a folder of Rego modules and one ``data.json``, versioned by digest.

Invariants:

* A bundle is exactly the ``*.rego`` and ``*.json`` files directly in its folder (what the
  package ships as ``rego/*/*.rego`` and ``rego/*/*.json``). Files ending ``_test.rego`` are
  tests; the others are the policy.
* The digest is SHA-256 over the files in ascending order of their names compared as UTF-8
  bytes; each file contributes ``name``, a NUL byte, its size as 8 bytes big-endian, then its
  bytes. Any edit, rename, addition or removal changes the digest.
* The static data lives under the top-level key ``centinela_config`` of ``data.json``;
  ``data.dynamic`` (sites, authorisations) is pushed by the server and never read from disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from centinela.errors import ConfigError

CONFIG_KEY = "centinela_config"
ENTRYPOINT = "centinela/decision"
#: The file the embedded test runner replaces with a stub (it holds the `with` clauses).
OPA_ONLY_TEST_MODULE = "check_test.rego"
CHECK_STUB = "package centinela_test\n\ncheck(_) := false\n"

_PACKAGE_RE = re.compile(r"^package\s+([A-Za-z_][\w.]*)", re.M)
_TEST_RE = re.compile(r"^(test_\w+)\s+if\b", re.M)


def packaged_root() -> Path:
    """The folder holding the bundles shipped with the package."""
    return Path(str(resources.files("centinela.policy") / "rego"))


def bundle_names() -> list[str]:
    """Names of the bundles shipped with the package."""
    root = packaged_root()
    return sorted(p.name for p in root.iterdir() if (p / "data.json").is_file())


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Rego's ``object.union``: objects merge recursively, anything else replaces."""
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One Rego test's outcome."""

    name: str
    package: str
    passed: bool
    message: str = ""

    __test__ = False  # not a pytest class


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its files (name -> text), parsed data and digest."""

    name: str
    path: Path
    files: Mapping[str, str]
    data: Mapping[str, Any]
    digest: str

    @classmethod
    def load(cls, name_or_path: str | Path) -> Bundle:
        """Load a packaged bundle by name (``interim``) or a bundle folder by path.

        Raises:
            ConfigError: no such bundle, unreadable files, or a data.json that is not a JSON
                object with a ``centinela_config`` object.
        """
        candidate = Path(name_or_path)
        if not candidate.is_dir():
            packaged = packaged_root() / str(name_or_path)
            if not packaged.is_dir() or "/" in str(name_or_path):
                raise ConfigError(
                    f"no policy bundle {str(name_or_path)!r}; "
                    f"packaged bundles: {', '.join(bundle_names())}"
                )
            candidate = packaged
        files: dict[str, str] = {}
        try:
            for p in sorted(candidate.iterdir(), key=lambda q: q.name.encode()):
                if p.is_file() and p.suffix in {".rego", ".json"}:
                    files[p.name] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read policy bundle {candidate}: {exc}") from exc
        if "data.json" not in files:
            raise ConfigError(f"policy bundle {candidate} has no data.json")
        try:
            data = json.loads(files["data.json"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{candidate}/data.json is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get(CONFIG_KEY), dict):
            raise ConfigError(f"{candidate}/data.json must hold an object under {CONFIG_KEY!r}")
        return cls(candidate.name, candidate, files, data, digest_files(files))

    @property
    def config(self) -> Mapping[str, Any]:
        """``data.centinela_config``: roles, galleries, floors, ceilings, retention, …"""
        cfg: Mapping[str, Any] = self.data[CONFIG_KEY]
        return cfg

    @property
    def policy_modules(self) -> dict[str, str]:
        """The policy's Rego modules (tests excluded)."""
        return {n: s for n, s in self.files.items() if n.endswith(".rego") and not is_test(n)}

    @property
    def test_modules(self) -> dict[str, str]:
        """The test modules (``*_test.rego``)."""
        return {n: s for n, s in self.files.items() if is_test(n)}

    def floors(self) -> dict[str, float]:
        """Gallery -> calibrated threshold floor (R8), for checking decisions on the way out."""
        out: dict[str, float] = {}
        for g, spec in dict(self.config.get("galleries", {})).items():
            floor = spec.get("threshold_floor") if isinstance(spec, dict) else None
            if isinstance(floor, int | float) and not isinstance(floor, bool):
                out[g] = float(floor)
        return out

    def rules(self) -> list[str]:
        """The rule ids this bundle declares it implements (``bundle.rules`` in data.json)."""
        rules = self.config.get("bundle", {}).get("rules", [])
        return [r for r in rules if isinstance(r, str)]

    def test_names(self) -> list[tuple[str, str]]:
        """(package, test rule) for every ``test_`` rule in the test modules."""
        out: list[tuple[str, str]] = []
        for src in self.test_modules.values():
            m = _PACKAGE_RE.search(src)
            pkg = m.group(1) if m else ""
            out.extend((pkg, t) for t in _TEST_RE.findall(src))
        return out

    def run_tests(self) -> list[TestResult]:
        """Run this bundle's Rego tests through the embedded engine; see ``testing.py``."""
        from centinela.policy.testing import run_bundle_tests

        return run_bundle_tests(self)


def is_test(name: str) -> bool:
    """Whether a bundle file is a Rego test module."""
    return name.endswith("_test.rego")


def digest_files(files: Mapping[str, str]) -> str:
    """SHA-256 over the files, in the order and framing documented in the module docstring."""
    h = hashlib.sha256()
    for name in sorted(files, key=lambda n: n.encode()):
        body = files[name].encode("utf-8")
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(len(body).to_bytes(8, "big"))
        h.update(body)
    return h.hexdigest()

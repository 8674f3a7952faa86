"""``centinela policy …``: test, evaluate and fingerprint policy bundles.

Exit codes: 0 success (tests passed / decision printed / digest printed); 1 a Rego test
failed, or ``eval --expect-allow``/``--expect-deny`` did not hold; 2 usage error, unreadable
bundle or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from centinela.errors import CentinelaError
from centinela.policy.bundle import Bundle, bundle_names
from centinela.policy.engine import EmbeddedEngine

_EPILOG = """\
BUNDLE is a packaged bundle name ({names}) or a path to a bundle folder.

examples:
  centinela policy test                    # every packaged bundle
  centinela policy test draft-2026 -v      # one bundle, one line per test
  centinela policy eval --bundle interim --input request.json
  centinela policy eval --bundle ./my-bundle --input req.json --dynamic db.json
  centinela policy digest interim
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="centinela policy",
        description="Test, evaluate and fingerprint Centinela's Rego policy bundles.",
        epilog=_EPILOG.format(names=", ".join(bundle_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("test", help="run a bundle's Rego tests (exit 1 on any failure)")
    t.add_argument("bundle", nargs="*", metavar="BUNDLE", help="default: every packaged bundle")
    t.add_argument(
        "-v", "--verbose", action="store_true", help="print every test, not only failures"
    )
    t.add_argument("--json", action="store_true", help="machine-readable results")

    e = sub.add_parser(
        "eval", help="decide one input and print the decision and the rules that fired"
    )
    e.add_argument("--bundle", required=True, metavar="BUNDLE")
    e.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="FILE.json",
        help="the input document ('-' for stdin)",
    )
    e.add_argument(
        "--dynamic", type=Path, metavar="FILE.json", help="data.dynamic: sites and authorisations"
    )
    e.add_argument("--json", action="store_true", help="print the decision as JSON")

    d = sub.add_parser("digest", help="print the SHA-256 digest of a bundle")
    d.add_argument("bundle", nargs="*", metavar="BUNDLE", help="default: every packaged bundle")
    return p


def _read_json(path: Path) -> Any:
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    return json.loads(text)


def _cmd_test(args: argparse.Namespace, out: TextIO) -> int:
    failed_any = False
    report: dict[str, Any] = {}
    for name in args.bundle or bundle_names():
        bundle = Bundle.load(name)
        results = bundle.run_tests()
        failed = [r for r in results if not r.passed]
        failed_any |= bool(failed)
        report[bundle.name] = {
            "digest": bundle.digest,
            "passed": len(results) - len(failed),
            "failed": [{"name": r.name, "message": r.message} for r in failed],
        }
        if args.json:
            continue
        for r in results:
            if args.verbose or not r.passed:
                status = "PASS" if r.passed else "FAIL"
                line = f"  {status} {r.name}"
                out.write(line + (f"\n       {r.message}" if r.message else "") + "\n")
        out.write(
            f"{bundle.name} ({bundle.digest[:12]}): {len(results) - len(failed)} passed, "
            f"{len(failed)} failed\n"
        )
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    return 1 if failed_any else 0


def _cmd_eval(args: argparse.Namespace, out: TextIO) -> int:
    bundle = Bundle.load(args.bundle)
    dynamic = _read_json(args.dynamic) if args.dynamic else {}
    engine = EmbeddedEngine(bundle, dynamic)
    decision = engine.decide(_read_json(args.input))
    if args.json:
        out.write(json.dumps(decision.as_dict(), indent=2) + "\n")
        return 0
    verdict = "ALLOW" if decision.allow else "DENY"
    label = "constrained by" if decision.allow else "denied by"
    out.write(f"{verdict}  ({bundle.name} {bundle.digest[:12]}, {decision.engine} engine)\n")
    out.write(f"  {label}: {', '.join(decision.reasons) or '-'}\n")
    if decision.details:
        out.write(f"  malformed fields: {', '.join(decision.details)}\n")
    out.write("  obligations:\n")
    for key, value in decision.obligations.as_dict().items():
        out.write(f"    {key}: {json.dumps(value)}\n")
    return 0


def _cmd_digest(args: argparse.Namespace, out: TextIO) -> int:
    for name in args.bundle or bundle_names():
        bundle = Bundle.load(name)
        out.write(f"{bundle.digest}  {bundle.name}\n")
    return 0


def main(argv: list[str], out: TextIO | None = None) -> int:
    """Entry point for ``centinela policy ARGS``; returns the exit code."""
    stream = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        if args.command == "test":
            return _cmd_test(args, stream)
        if args.command == "eval":
            return _cmd_eval(args, stream)
        return _cmd_digest(args, stream)
    except CentinelaError as exc:
        sys.stderr.write(f"centinela policy: {exc.diagnostics()}\n")
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"centinela policy: cannot read input: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The ``centinela`` command: one entry point whose sub-commands live with their component.

This module is the composition root of the command line: it imports each component's
command module only when that sub-command runs, so ``centinela --help`` stays fast and a
missing optional extra (``edge``) affects only its own commands.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from centinela import __version__

#: Sub-commands implemented by a component: name -> (module, function, one-line help).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "audit": ("centinela.audit.cli", "main", "audit log: export, verify, and compliance tools"),
    "policy": ("centinela.policy.cli", "main", "policy bundles: test, eval, digest"),
    "edge": ("centinela.clients.edge_cli", "main", "edge agent: match faces and plates, portico"),
    "admin": ("centinela.clients.admin_cli", "main", "PNP admin: requisitorias, vehicles, sites"),
    "registry": ("centinela.clients.registry_cli", "main", "Reniec registry: import, objections"),
    "alerts": ("centinela.clients.alerts_cli", "main", "control centers: live alerts, sightings"),
}


def _serve(args: argparse.Namespace) -> int:
    from centinela import logs
    from centinela.config import Settings
    from centinela.errors import CentinelaError
    from centinela.server.app import run

    try:
        settings = Settings.load(
            args.config,
            data_dir=args.data_dir,
            listen=args.listen,
            insecure_dev=True if args.insecure_dev else None,
            policy_bundle=args.policy,
        )
        logs.configure(settings.log_level)
        asyncio.run(run(settings))
    except CentinelaError as exc:
        print(f"centinela serve: {exc.diagnostics()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    from centinela.config import Settings
    from centinela.server.certs import DEV_IDENTITIES, init_dev_pki

    settings = Settings.load(args.config, data_dir=args.data_dir)
    certs_dir = settings.effective_certs_dir
    written = init_dev_pki(certs_dir, force=args.force)
    if not written:
        print(f"certificates already exist in {certs_dir} (use --force to re-create them)")
        return 0
    print(f"development PKI in {certs_dir}:")
    print("  ca.crt / ca.key        Centinela dev CA (trust anchor for server and clients)")
    print("  server.crt / .key      server certificate for localhost, 127.0.0.1, ::1")
    for ident in DEV_IDENTITIES:
        roles = ",".join(ident.roles)
        print(
            f"  {ident.name + '.crt / .key':<22} {ident.kind:<12} "
            f"roles={roles:<26} {ident.description}"
        )
    print("These are for development only: production issues certificates from its own CA.")
    return 0


def _certs_revoke(args: argparse.Namespace) -> int:
    from cryptography import x509

    from centinela.config import Settings
    from centinela.server import certs

    settings = Settings.load(args.config, data_dir=args.data_dir)
    certs_dir = settings.effective_certs_dir
    ca = certs.TlsFiles(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "ca.crt")
    target = Path(args.name)
    if target.suffix != ".crt":
        target = certs_dir / f"{args.name}.crt"
    try:
        cert = x509.load_pem_x509_certificate(target.read_bytes())
        crl = settings.effective_crl_file
        added = certs.revoke(ca, crl, cert, days=args.days)
    except (OSError, ValueError, certs.CrlError) as exc:
        print(f"centinela certs revoke: {exc}", file=sys.stderr)
        return 2
    state = "revoked" if added else "was already revoked"
    print(
        f"{target.stem} (serial {cert.serial_number:x}) {state}; {crl} is valid for "
        f"{args.days} days (renew it with `centinela certs crl`). A running server refuses "
        "the certificate from its next call on."
    )
    return 0


def _certs_crl(args: argparse.Namespace) -> int:
    from centinela.config import Settings
    from centinela.server import certs

    settings = Settings.load(args.config, data_dir=args.data_dir)
    certs_dir = settings.effective_certs_dir
    ca = certs.TlsFiles(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "ca.crt")
    try:
        count = certs.renew_crl(ca, settings.effective_crl_file, days=args.days)
    except (OSError, ValueError, certs.CrlError) as exc:
        print(f"centinela certs crl: {exc}", file=sys.stderr)
        return 2
    print(
        f"{settings.effective_crl_file}: {count} revoked certificate(s), valid for {args.days} "
        "days. Past that the server refuses every call: renew it before."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centinela",
        description="Centinela: privacy-governed identity matching with policy and audit.",
    )
    parser.add_argument("--version", action="version", version=f"centinela {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC service (mutual TLS)")
    serve.add_argument("--data-dir", type=Path, help="data directory (default .centinela)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:50051)")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    serve.add_argument("--policy", help="active policy bundle (interim or draft-2026)")
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="UNSAFE: plaintext on loopback without client certificates, for experiments",
    )
    serve.set_defaults(func=_serve)

    certs = sub.add_parser("certs", help="development certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = certs_sub.add_parser("init", help="create a dev CA, server and per-role client certs")
    init.add_argument("--data-dir", type=Path, help="data directory (default .centinela)")
    init.add_argument("--config", type=Path, help="TOML settings file")
    init.add_argument("--force", action="store_true", help="re-create everything (new CA)")
    init.set_defaults(func=_certs_init)
    revoke = certs_sub.add_parser(
        "revoke", help="add a certificate to the CA's revocation list (crl.pem)"
    )
    revoke.add_argument("name", help="identity name (e.g. pnp-officer) or path to a .crt file")
    revoke.add_argument("--days", type=int, default=30, help="CRL validity (default 30)")
    revoke.add_argument("--data-dir", type=Path, help="data directory (default .centinela)")
    revoke.add_argument("--config", type=Path, help="TOML settings file")
    revoke.set_defaults(func=_certs_revoke)
    crl = certs_sub.add_parser("crl", help="create or re-sign the revocation list")
    crl.add_argument("--days", type=int, default=30, help="CRL validity (default 30)")
    crl.add_argument("--data-dir", type=Path, help="data directory (default .centinela)")
    crl.add_argument("--config", type=Path, help="TOML settings file")
    crl.set_defaults(func=_certs_crl)

    for name, (_mod, _fn, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``centinela`` command; return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        module_name, fn_name, _ = DELEGATED[args_list[0]]
        import importlib

        fn: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), fn_name)
        return fn(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

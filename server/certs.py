"""Development PKI: a Centinela CA, a server certificate and one client certificate per role.

Invariants:

* Every key is created here, written with mode 0600 in a directory of mode 0700, and never
  logged. Existing material is never overwritten unless ``force`` is given.
* Client certificates carry the caller's organisation (subject O), name (CN) and its kind,
  roles and region as SAN URIs (see ``centinela.server.identity``): the server derives the
  caller from the verified certificate alone.
* This PKI is for development and tests. Production deployments issue certificates from
  their own CA with the same subject and SAN layout.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from centinela.server.identity import identity_uris


@dataclasses.dataclass(frozen=True)
class DevIdentity:
    """A client identity created by ``centinela certs init``."""

    name: str
    org: str
    kind: str
    roles: tuple[str, ...]
    region: str = ""
    description: str = ""


DEV_IDENTITIES: tuple[DevIdentity, ...] = (
    DevIdentity(
        "muni-miraflores",
        "muni-miraflores",
        "municipality",
        ("operator", "control_center"),
        "lima",
        "Miraflores porticos and Serenazgo",
    ),
    DevIdentity(
        "muni-la-victoria",
        "muni-la-victoria",
        "municipality",
        ("operator", "control_center"),
        "lima",
        "La Victoria (Gamarra) cameras",
    ),
    DevIdentity("pnp-admin", "pnp", "pnp", ("admin",), "", "PNP requisition administrators"),
    DevIdentity(
        "pnp-investigator",
        "pnp-dirincri",
        "pnp",
        ("investigator", "officer"),
        "lima",
        "PNP investigator (judicial searches, 1:1 verification)",
    ),
    DevIdentity(
        "pnp-officer",
        "pnp-lima",
        "pnp",
        ("officer",),
        "lima",
        "PNP officer (verification, alert review)",
    ),
    DevIdentity(
        "pnp-center-lima",
        "pnp-lima",
        "pnp",
        ("control_center", "officer"),
        "lima",
        "PNP control center of the Lima region",
    ),
    DevIdentity(
        "pnp-national",
        "pnp-national",
        "pnp",
        ("control_center", "officer"),
        "*",
        "PNP national command (all regions)",
    ),
    DevIdentity("reniec", "reniec", "reniec", ("admin",), "", "Reniec registry data owner"),
    DevIdentity(
        "compliance",
        "compliance",
        "compliance",
        ("auditor",),
        "",
        "Compliance officers (audit reads)",
    ),
)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Paths of one party's TLS material."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA certificate) as PEM bytes."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(
    directory: Path, name: str = "Centinela Dev CA", *, validity_days: int = 3650
) -> TlsFiles:
    """Create a self-signed CA (``ca.crt``, ``ca.key``) in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Centinela"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(directory / "ca.key", _key_pem(key))
    (directory / "ca.crt").write_bytes(_cert_pem(cert))
    return TlsFiles(directory / "ca.crt", directory / "ca.key", directory / "ca.crt")


def _load_ca(ca: TlsFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key must be an EC key")
    return cert, key


def issue(
    ca: TlsFiles,
    directory: Path,
    filename: str,
    *,
    common_name: str,
    org: str,
    server_names: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> TlsFiles:
    """Issue a leaf certificate signed by ``ca`` into ``directory/filename.{crt,key}``.

    ``server_names`` (DNS names or IP addresses) make a server certificate; ``uris`` make a
    client certificate carrying a Centinela identity.
    """
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    san: list[x509.GeneralName] = []
    for n in server_names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            san.append(x509.DNSName(n))
    san.extend(x509.UniformResourceIdentifier(u) for u in uris)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(directory / f"{filename}.key", _key_pem(key))
    (directory / f"{filename}.crt").write_bytes(_cert_pem(cert))
    return TlsFiles(directory / f"{filename}.crt", directory / f"{filename}.key", ca.cert)


def issue_client(
    ca: TlsFiles,
    directory: Path,
    ident: DevIdentity,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> TlsFiles:
    """Issue the client certificate of one identity."""
    return issue(
        ca,
        directory,
        ident.name,
        common_name=ident.name,
        org=ident.org,
        uris=tuple(identity_uris(ident.kind, ident.roles, ident.region)),
        not_before=not_before,
        not_after=not_after,
    )


def init_dev_pki(certs_dir: Path, *, force: bool = False) -> list[Path]:
    """Create the development CA, server and client certificates; return files written.

    Existing files are kept unless ``force``; missing ones are added (so a new role appears
    after an upgrade without invalidating the others).
    """
    written: list[Path] = []
    ca_files = TlsFiles(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "ca.crt")
    if force or not (ca_files.cert.exists() and ca_files.key.exists()):
        ca_files = create_ca(certs_dir)
        written += [ca_files.cert, ca_files.key]
        force = True  # everything must be re-issued under the new CA
    if force or not (certs_dir / "server.crt").exists():
        issue(
            ca_files,
            certs_dir,
            "server",
            common_name="centinela-server",
            org="Centinela",
            server_names=("localhost", "127.0.0.1", "::1"),
        )
        written += [certs_dir / "server.crt", certs_dir / "server.key"]
    for ident in DEV_IDENTITIES:
        if force or not (certs_dir / f"{ident.name}.crt").exists():
            issue_client(ca_files, certs_dir, ident)
            written += [certs_dir / f"{ident.name}.crt", certs_dir / f"{ident.name}.key"]
    return written


def client_files(certs_dir: Path, name: str) -> TlsFiles:
    """The TLS files of a dev identity in ``certs_dir``."""
    return TlsFiles(certs_dir / f"{name}.crt", certs_dir / f"{name}.key", certs_dir / "ca.crt")


def server_files(certs_dir: Path) -> TlsFiles:
    """The server's TLS files in ``certs_dir``."""
    return TlsFiles(certs_dir / "server.crt", certs_dir / "server.key", certs_dir / "ca.crt")

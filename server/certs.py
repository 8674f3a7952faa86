"""Development PKI: a Centinela CA, a server certificate and one client certificate per role.

Invariants:

* Every key is created here, written with mode 0600 in a directory of mode 0700, and never
  logged. Existing material is never overwritten unless ``force`` is given.
* Client certificates carry the caller's organisation (subject O), name (CN) and its kind,
  roles and region as SAN URIs (see ``centinela.server.identity``): the server derives the
  caller from the verified certificate alone.
* This PKI is for development and tests. Production deployments issue certificates from
  their own CA with the same subject and SAN layout.
* Revocation: ``revoke`` adds a certificate's serial to a CRL signed by the CA
  (``crl.pem`` beside the certificates; PEM, X.509 v2). The server checks every call's peer
  certificate against it (:class:`RevocationChecker`, because gRPC's TLS stack does not check
  CRLs) and re-reads it when the file changes. A CRL that does not verify against the CA, has
  passed its ``nextUpdate``, or vanished after being read fails closed: every call is
  refused until a valid CRL is back. Absent from the start (and not configured explicitly),
  there is simply nothing revoked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
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
        # A CRL of the old CA would not verify under the new one (and the server would
        # refuse every call); its certificates are gone with it.
        (certs_dir / CRL_FILENAME).unlink(missing_ok=True)
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


# ---- revocation ------------------------------------------------------------------------

#: The CRL's file name in the certificate directory (the default of ``Settings.crl_file``).
CRL_FILENAME = "crl.pem"
#: Validity of a CRL written by ``revoke``/``renew_crl``: the server refuses every call once
#: it passes, so whoever operates the CA re-signs it (``centinela certs crl``) well before.
DEFAULT_CRL_DAYS = 30
#: Tolerated clock difference between the CA that signed a CRL and the server.
CRL_CLOCK_SKEW = dt.timedelta(minutes=5)


class CrlError(Exception):
    """A CRL that cannot be used: unreadable, not signed by the CA, expired or premature."""


def load_crl(
    path: Path,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime | None = None,
    allow_expired: bool = False,
) -> x509.CertificateRevocationList:
    """Read a PEM (or DER) CRL and check it is the CA's and current.

    Raises:
        CrlError: unreadable, issued by another CA, bad signature, no or passed
            ``nextUpdate``, or a ``lastUpdate`` in the future.
    """
    now = now or _now()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CrlError(f"cannot read {path.name}: {type(exc).__name__}") from exc
    try:
        if b"-----BEGIN" in data:
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"{path.name} is not a CRL") from exc
    if crl.issuer != ca_cert.subject:
        raise CrlError(f"{path.name} was issued by another CA")
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CrlError("the CA's key type cannot verify CRLs")
    if not crl.is_signature_valid(public_key):
        raise CrlError(f"{path.name} does not verify against the CA")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlError(f"{path.name} has no nextUpdate")
    if now >= next_update and not allow_expired:
        raise CrlError(f"{path.name} expired at {next_update.isoformat()}")
    if crl.last_update_utc > now + CRL_CLOCK_SKEW:
        raise CrlError(f"{path.name} is dated in the future")
    return crl


def _write_crl(
    ca: TlsFiles,
    path: Path,
    revoked: list[x509.RevokedCertificate],
    *,
    number: int,
    days: float,
) -> x509.CertificateRevocationList:
    ca_cert, ca_key = _load_ca(ca)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    # Written whole then renamed: a server reading it never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".crl-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(crl.public_bytes(serialization.Encoding.PEM))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return crl


def _existing(ca: TlsFiles, path: Path) -> tuple[list[x509.RevokedCertificate], int]:
    """The entries and next CRL number of the CA's current CRL at ``path`` (none if absent).

    An expired CRL is still a list of revoked serials: it is carried over, not dropped.
    """
    if not path.exists():
        return [], 1
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    crl = load_crl(path, ca_cert, allow_expired=True)
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        number = 1
    return list(crl), number


def revoke(
    ca: TlsFiles,
    crl_path: Path,
    cert: x509.Certificate,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
    days: float = DEFAULT_CRL_DAYS,
) -> bool:
    """Add ``cert`` to the CA's CRL at ``crl_path`` (created if absent) and re-sign it.

    Returns False when the certificate was already revoked (the CRL is re-signed anyway,
    which also renews it).

    Raises:
        CrlError: the existing CRL is not the CA's (it is never overwritten then).
        ValueError: ``cert`` was not issued by this CA.
    """
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    if cert.issuer != ca_cert.subject:
        raise ValueError("the certificate was not issued by this CA")
    revoked, number = _existing(ca, crl_path)
    if any(r.serial_number == cert.serial_number for r in revoked):
        _write_crl(ca, crl_path, revoked, number=number, days=days)
        return False
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(_now())
        .add_extension(x509.CRLReason(reason), critical=False)
        .build()
    )
    _write_crl(ca, crl_path, [*revoked, entry], number=number, days=days)
    return True


def renew_crl(ca: TlsFiles, crl_path: Path, *, days: float = DEFAULT_CRL_DAYS) -> int:
    """Re-sign the CA's CRL with a fresh ``nextUpdate`` (create it empty if absent); return
    the number of revoked serials it lists.

    Raises:
        CrlError: the existing CRL is not the CA's.
    """
    revoked, number = _existing(ca, crl_path)
    _write_crl(ca, crl_path, revoked, number=number, days=days)
    return len(revoked)


class RevocationUnavailable(Exception):
    """Revocation cannot be checked (no valid CRL): every call is refused (fail closed)."""


class RevocationChecker:
    """Checks peer certificate serials against the CA's CRL, re-reading it when it changes.

    * The file is ``stat``-ed on every check; a change of inode, size or modification time
      reloads and re-verifies it (``load_crl``). Expiry is checked on every call.
    * ``required``: the CRL must exist (the setting names it explicitly). Otherwise a CRL
      absent from the start means nothing is revoked; one that vanishes after being read
      fails closed (a deleted list must not un-revoke anyone).
    * On a failure, every check raises :class:`RevocationUnavailable` until a valid CRL is
      in place; the error is logged once per change of state, by the caller's logger.
    """

    def __init__(self, crl_path: Path, ca_path: Path, *, required: bool = False) -> None:
        self.crl_path = Path(crl_path)
        self.ca_path = Path(ca_path)
        self.required = required
        self._stamp: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._next_update: dt.datetime | None = None
        self._problem: str | None = None
        self._seen = False
        #: Bumped at every state change (a new CRL, a new problem), for once-only logging.
        self.generation = 0

    @property
    def problem(self) -> str | None:
        """Why revocation cannot be checked right now (None when it can)."""
        return self._problem

    def _set(
        self, serials: frozenset[int], next_update: dt.datetime | None, problem: str | None
    ) -> None:
        if (serials, next_update, problem) != (self._serials, self._next_update, self._problem):
            self.generation += 1
        self._serials, self._next_update, self._problem = serials, next_update, problem

    def _refresh(self, now: dt.datetime) -> None:
        try:
            st = os.stat(self.crl_path)
        except FileNotFoundError:
            self._stamp = None
            if self.required or self._seen:
                self._set(frozenset(), None, f"{self.crl_path.name} is missing")
            else:
                self._set(frozenset(), None, None)
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._seen = True
        try:
            ca_cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        except (OSError, ValueError) as exc:
            self._set(frozenset(), None, f"cannot read the CA certificate: {type(exc).__name__}")
            return
        try:
            crl = load_crl(self.crl_path, ca_cert, now=now)
        except CrlError as exc:
            self._set(frozenset(), None, str(exc))
            return
        self._set(frozenset(r.serial_number for r in crl), crl.next_update_utc, None)

    def is_revoked(self, serial: int, *, now: dt.datetime | None = None) -> bool:
        """Whether ``serial`` is on the CA's current CRL.

        Raises:
            RevocationUnavailable: no valid CRL (fail closed).
        """
        now = now or _now()
        self._refresh(now)
        if self._problem is None and self._next_update is not None and now >= self._next_update:
            self._set(
                frozenset(),
                None,
                f"{self.crl_path.name} expired at {self._next_update.isoformat()}",
            )
        if self._problem is not None:
            raise RevocationUnavailable(self._problem)
        return serial in self._serials

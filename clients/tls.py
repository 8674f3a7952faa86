"""A client's mutual-TLS material: its certificate, its private key and the Centinela CA.

Invariants:

* A channel is never made without a client certificate and a CA to verify the server
  against (DESIGN.md §7: mutual TLS on every port). There is no plaintext client here; the
  server's ``--insecure-dev`` mode is for experiments with other tools.
* The private key is read from its file when a client starts and held only in memory; it is
  never logged or copied. A missing or unreadable file is a :class:`ConfigError` that names the
  file and the option that sets it, not the file's content.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from centinela.errors import ConfigError

#: Default address of a Centinela server (``centinela serve`` listens here by default).
DEFAULT_SERVER = "127.0.0.1:50051"
#: Default data directory (as for ``centinela serve``).
DEFAULT_DATA_DIR = Path(".centinela")


def _read(path: Path, what: str, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist; set it with {option}") from None
    except OSError as exc:
        raise ConfigError(
            f"{what} file {path} cannot be read ({exc.strerror}); set it with {option}"
        ) from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} file {path} is not PEM; set it with {option}")
    return data


@dataclasses.dataclass(frozen=True, repr=False)
class TlsMaterial:
    """PEM bytes of a client certificate chain, its private key and the CA certificate."""

    cert: bytes
    key: bytes
    ca: bytes
    #: Where the certificate came from, for messages (never the key's content).
    source: str = ""

    def __repr__(self) -> str:
        return f"TlsMaterial(source={self.source!r})"

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> TlsMaterial:
        """Read the three PEM files.

        Raises:
            ConfigError: a file is missing, unreadable or not PEM.
        """
        return cls(
            cert=_read(cert, "client certificate", "--cert"),
            key=_read(key, "client key", "--key"),
            ca=_read(ca, "CA certificate", "--ca"),
            source=str(cert),
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path, identity: str) -> TlsMaterial:
        """The development identity ``identity`` from ``<data_dir>/certs`` (``centinela certs
        init``).

        Raises:
            ConfigError: the identity's files are not there.
        """
        certs_dir = Path(data_dir) / "certs"
        cert = certs_dir / f"{identity}.crt"
        if not cert.exists():
            known = sorted(
                p.stem for p in certs_dir.glob("*.crt") if p.stem not in {"ca", "server"}
            )
            hint = f" (known: {', '.join(known)})" if known else ""
            raise ConfigError(
                f"no certificate for identity {identity!r} in {certs_dir}{hint}; run "
                "`centinela certs init --data-dir DIR` or pass --cert/--key/--ca"
            )
        return cls.from_files(cert, certs_dir / f"{identity}.key", certs_dir / "ca.crt")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for mutual TLS."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

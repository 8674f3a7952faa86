"""Typed settings, read from a TOML file and ``CENTINELA_*`` environment variables.

Precedence, lowest first: built-in defaults, the TOML file (``--config``), environment
variables, command-line overrides. Every setting has a default that runs the service
embedded on one machine (SQLite and keys under the data directory, embedded Rego).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from centinela.errors import ConfigError

DEFAULT_DATA_DIR = Path(".centinela")
DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclasses.dataclass(frozen=True)
class Settings:
    """All of Centinela's settings; see ``deploy/centinela.example.toml``."""

    data_dir: Path = DEFAULT_DATA_DIR
    listen: str = DEFAULT_LISTEN
    #: SQLAlchemy URL; empty means SQLite in the data directory.
    database_url: str = ""
    #: Active policy bundle: a name under ``policy/rego/`` or a directory path.
    policy_bundle: str = "interim"
    #: Optional shadow bundle evaluated beside the active one (disagreements counted), always
    #: in process: an OPA server holds one bundle.
    shadow_bundle: str = ""
    #: ``embedded`` (regopy) or ``opa`` (an OPA server at ``opa_url``).
    policy_engine: str = "embedded"
    opa_url: str = "http://127.0.0.1:8181"
    #: Plaintext loopback only, for experiments. Never in production.
    insecure_dev: bool = False
    log_level: str = "info"
    #: Cut a signed checkpoint every N entries or T seconds, whichever comes first.
    checkpoint_every_entries: int = 1000
    checkpoint_every_seconds: float = 10.0
    #: Largest gRPC message accepted, in bytes.
    max_message_bytes: int = 8 * 1024 * 1024
    #: Work in flight (a call, or one probe of a StreamMatch) admitted before shedding with
    #: RESOURCE_EXHAUSTED: the ceiling of the adaptive limit below.
    max_concurrent_rpcs: int = 256
    #: StreamMatch probes are held at an adaptive limit: this many times the work the service
    #: completes in its own unloaded time (recent peak rate x lowest window mean, remeasured
    #: at ``admission_floor`` when stale), shared equally by the clients active in the last
    #: second and by their organisations (certificate ``O``: more certificates of one
    #: organisation do not widen its share), so that a flood over streams waits in its own
    #: queue and the others' time in the service stays near this multiple of the unloaded
    #: time. A client alone is held at ``max_concurrent_rpcs`` only (nobody to protect; a
    #: limit would only cost it throughput). 0: probes, like calls, are held at
    #: ``max_concurrent_rpcs`` always. See ``centinela.server.admission`` and
    #: docs/performance.md (sessions 16 to 19).
    admission_gain: float = 2.0
    #: The adaptive limit never goes below this many probes, and drops to it for one window
    #: every ten seconds while two or more clients are active, to remeasure the unloaded time.
    admission_floor: int = 2
    #: How long a call past the in-flight limit may wait for a unit, in milliseconds, in its
    #: caller's queue (units go round robin to the callers that wait); then
    #: RESOURCE_EXHAUSTED. 0 refuses at the limit at once (``centinela.server.admission``).
    admission_max_wait_ms: float = 250.0
    #: Calls one client certificate may have waiting at the in-flight limit; beyond it they
    #: are refused at once (RESOURCE_EXHAUSTED), so a flood's queue stays bounded.
    admission_queue_per_caller: int = 128
    #: Calls waiting for the server's event loop beyond which gRPC refuses new ones (clients
    #: see CANCELLED); bounds the queueing delay under overload (``centinela.server.admission``).
    max_pending_rpcs: int = 64
    #: HTTP/2 streams one client connection may have open at once (0: no limit). Beyond it
    #: the client's own transport holds new calls until a stream ends, so a connection that
    #: floods costs the server nothing past its share. 100 is RFC 9113's recommended floor: a
    #: gateway that multiplexes many porticos' day-long StreamMatch streams over one
    #: connection must not find its next stream held forever. Where every client is one
    #: portico, 8 keeps the others' calls under a 10x flood from one of them, as long as
    #: this bound times the connections one client opens stays below half of
    #: ``max_pending_rpcs`` (docs/performance.md; ``centinela.server.admission``).
    max_streams_per_connection: int = 100
    #: gRPC servers bound to the one port (SO_REUSEPORT), sharing the service and its
    #: admission, each taking calls in on its own. grpcio's asyncio server asks gRPC core for
    #: the next call of a method only once the event loop has taken the last, so with one
    #: server a flood's open streams wait in gRPC core's queue, in arrival order, ahead of
    #: everyone else's calls, where the per-caller queue of the admission cannot reorder
    #: them. The kernel spreads connections over the lanes by address, so a flood holds up
    #: only the clients on its lanes. Opt-in (docs/performance.md: intake lanes).
    intake_lanes: int = 1
    #: Grace period for in-flight calls on SIGTERM, in seconds.
    shutdown_grace_s: float = 10.0
    #: Directory of the key-encryption keys (embedded key provider); default under data_dir.
    keys_dir: Path | None = None
    #: Directory of TLS material; default ``data_dir/certs``.
    certs_dir: Path | None = None
    #: Certificate revocation list (PEM, signed by the CA), checked on every call and
    #: re-read when it changes; default ``certs_dir/crl.pem``, where a missing file means
    #: nothing is revoked. Set explicitly, the file must exist. An invalid or expired CRL
    #: refuses every call (fail closed).
    crl_file: Path | None = None
    #: Embedding model id of the face galleries; empty = the default edge model's id.
    face_model_id: str = ""
    #: Origin line of the audit log's checkpoints (C2SP tlog-checkpoint).
    audit_origin: str = "centinela.local/audit"
    #: HNSW snapshot directory (encrypted); default ``data_dir/snapshots``.
    snapshot_dir: Path | None = None

    # ---- derived ---------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'centinela.db').resolve()}"

    @property
    def effective_keys_dir(self) -> Path:
        return self.keys_dir if self.keys_dir is not None else self.data_dir / "keys"

    @property
    def effective_snapshot_dir(self) -> Path:
        return self.snapshot_dir if self.snapshot_dir is not None else self.data_dir / "snapshots"

    @property
    def effective_face_model_id(self) -> str:
        if self.face_model_id:
            return self.face_model_id
        from centinela.models import default_face_model_id

        return default_face_model_id()

    @property
    def effective_certs_dir(self) -> Path:
        return self.certs_dir if self.certs_dir is not None else self.data_dir / "certs"

    @property
    def effective_crl_file(self) -> Path:
        if self.crl_file is not None:
            return self.crl_file
        return self.effective_certs_dir / "crl.pem"

    def digest(self) -> str:
        """SHA-256 over the canonical settings, written into service start events."""
        doc = {k: str(v) for k, v in dataclasses.asdict(self).items()}
        # The database URL may carry a password: digest it, never show it.
        raw = json.dumps(doc, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()

    # ---- loading ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from defaults, a TOML file, the environment and overrides.

        Raises:
            ConfigError: the file cannot be read, or a value has the wrong type or name.
        """
        values: dict[str, Any] = {}
        if config_file is not None:
            try:
                with config_file.open("rb") as fh:
                    doc = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
            section = doc.get("centinela", doc)
            if not isinstance(section, dict):
                raise ConfigError("config file: [centinela] must be a table")
            values.update(section)
        environ = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            key = "CENTINELA_" + name.upper()
            if key in environ:
                values[name] = environ[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in values.items()})


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert strings from env/TOML to the field's declared type."""
    kind = str(annotation)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind in {"Path", "Path | None"}:
            if value in (None, ""):
                return None if "None" in kind else Path(".")
            return Path(str(value)).expanduser()
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from exc

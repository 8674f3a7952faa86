"""Start-up wiring: settings → storage, keys, audit, policy, matcher → gRPC server.

Invariants:

* Every port is mutual TLS: the server presents its certificate and requires a client
  certificate signed by the Centinela CA. The only exception is ``insecure_dev``
  (plaintext, loopback addresses only), which logs a warning at every start.
* Shutdown is graceful: on SIGTERM/SIGINT the server stops accepting calls, lets calls in
  flight finish within ``shutdown_grace_s``, then closes components in reverse order (the
  audit log flushes last, so no answered decision is lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from centinela import __version__
from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.logs import get_logger
from centinela.server import admission, certs
from centinela.server.identity import Caller
from centinela.server.interceptors import CentinelaInterceptor, TlsIdentity
from centinela.server.unimplemented import (
    UnimplementedAudit,
    UnimplementedMatch,
    UnimplementedRegistry,
    UnimplementedWatchlist,
)
from centinela.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    match_service_pb2,
    match_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
    watchlist_service_pb2,
    watchlist_service_pb2_grpc,
)

log = get_logger("server")
#: How often health follows the components' readiness, in seconds.
READINESS_INTERVAL_S = 1.0
#: The shortest interval at which a client may ping a connection that carries no data
#: (an open, idle stream) without being told to go away: clients keep a portico's stream
#: alive with pings every 20 s (``centinela.clients.client.KEEPALIVE_S``).
MIN_CLIENT_PING_S = 10.0

SERVICE_NAMES = (
    match_service_pb2.DESCRIPTOR.services_by_name["MatchService"].full_name,
    watchlist_service_pb2.DESCRIPTOR.services_by_name["WatchlistService"].full_name,
    registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)


@dataclasses.dataclass
class Servicers:
    """The four service implementations registered on the server."""

    match: Any = dataclasses.field(default_factory=UnimplementedMatch)
    watchlist: Any = dataclasses.field(default_factory=UnimplementedWatchlist)
    registry: Any = dataclasses.field(default_factory=UnimplementedRegistry)
    audit: Any = dataclasses.field(default_factory=UnimplementedAudit)


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reserve_port(listen: str) -> int:
    """The port ``listen`` names (a free one for port 0), after checking that no other
    socket listens there: a plain bind, without SO_REUSEPORT, fails against any listener,
    where the lanes' own binds would join one that set it.

    Raises:
        ConfigError: the address is invalid or the port is taken.
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            return int(probe.getsockname()[1])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc


def ensure_tls_material(settings: Settings) -> certs.TlsFiles:
    """The server's TLS files; on embedded defaults, a development PKI is made on first run.

    Raises:
        ConfigError: a configured certificate directory lacks the server's files.
    """
    certs_dir = settings.effective_certs_dir
    files = certs.server_files(certs_dir)
    if all(p.exists() for p in (files.cert, files.key, files.ca)):
        return files
    if settings.certs_dir is not None:
        raise ConfigError(
            f"certificate directory {certs_dir} lacks server.crt, server.key or ca.crt; "
            "create them with your CA, or run `centinela certs init --data-dir DIR`"
        )
    written = certs.init_dev_pki(certs_dir)
    log.warning("dev_pki_created", certs_dir=str(certs_dir), files=len(written))
    return files


class CentinelaServer:
    """A configured gRPC server: create, ``start()``, then ``wait()`` or ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        servicers: Servicers | None = None,
        *,
        identity: Callable[[grpc.aio.ServicerContext[Any, Any]], Caller] | None = None,
        on_stop: Callable[[], Any] | None = None,
        extra_handlers: Sequence[Any] = (),
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        readiness: Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self._extra_handlers = tuple(extra_handlers)
        #: Outside Centinela's own interceptor (benchmarks' instruments; nothing in production).
        self._extra_interceptors = tuple(extra_interceptors)
        self.servicers = servicers or Servicers()
        self.interceptor = CentinelaInterceptor(
            identity or TlsIdentity.from_settings(settings),
            admission.InFlight.from_settings(settings),
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self._on_stop = on_stop
        self._servers: list[grpc.aio.Server] = []
        self._stopped = asyncio.Event()
        self._readiness = readiness
        self._watch: asyncio.Task[None] | None = None

    def _credentials(self) -> grpc.ServerCredentials:
        files = ensure_tls_material(self.settings)
        cert, key, ca = files.read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    async def start(self) -> int:
        """Bind, register the services and start serving; return the bound port.

        With ``intake_lanes`` above 1 the port is bound that many times (SO_REUSEPORT), one
        gRPC server each, all sharing the servicers, the interceptor and its admission
        (:func:`reserve_port` first checks that no other process listens there).

        If the server cannot start, ``on_stop`` runs before the error is raised, so the
        components it would have closed are not left running.

        Raises:
            ConfigError: insecure mode on a non-loopback address, or the port is taken.
        """
        try:
            return await self._start_lanes()
        except BaseException:
            await self._close_components()
            raise

    async def _start_lanes(self) -> int:
        listen = self.settings.listen
        if self.settings.insecure_dev and not _is_loopback(listen):
            raise ConfigError("--insecure-dev listens on loopback addresses only")
        lanes = self.settings.intake_lanes
        if lanes < 1:
            raise ConfigError("intake_lanes must be at least 1")
        credentials = None if self.settings.insecure_dev else self._credentials()
        if lanes > 1:
            host = listen.rsplit(":", 1)[0]
            listen = f"{host}:{reserve_port(listen)}"
        servers = []
        try:
            for _ in range(lanes):
                servers.append(self._bind(listen, credentials, reuse_port=lanes > 1))
            for server in servers:
                await server.start()
        except BaseException:
            await asyncio.gather(*(server.stop(None) for server in servers))
            raise
        self._servers = servers
        if self.settings.insecure_dev:
            log.warning(
                "INSECURE_DEV_MODE",
                detail="plaintext gRPC without client certificates; for local experiments "
                "only, never with real data",
            )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self._readiness is not None:
            self._watch = asyncio.create_task(self._watch_readiness(self._readiness))
        log.info("server.started", listen=listen, port=self.port, lanes=lanes, version=__version__)
        return self.port

    @property
    def lanes(self) -> int:
        """gRPC servers bound to the port (``intake_lanes`` once started)."""
        return len(self._servers)

    def _bind(
        self, listen: str, credentials: grpc.ServerCredentials | None, *, reuse_port: bool
    ) -> grpc.aio.Server:
        """One gRPC server with every service on ``listen``; sets :attr:`port`."""
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[*self._extra_interceptors, self.interceptor],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", int(reuse_port)),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.max_pings_without_data", 0),
                # Clients ping an idle open call to find dead connections (a portico's
                # stream: centinela.clients.client.KEEPALIVE_S); gRPC's default would
                # answer pings more often than every 5 minutes with GOAWAY.
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(MIN_CLIENT_PING_S * 1000),
                ),
                *admission.server_options(self.settings),
            ],
            maximum_concurrent_rpcs=None,
        )
        s = self.servicers
        match_service_pb2_grpc.add_MatchServiceServicer_to_server(s.match, server)
        watchlist_service_pb2_grpc.add_WatchlistServiceServicer_to_server(s.watchlist, server)
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(s.registry, server)
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(s.audit, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self._extra_handlers:
            server.add_generic_rpc_handlers(self._extra_handlers)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if credentials is None:
                self.port = server.add_insecure_port(listen)
            else:
                self.port = server.add_secure_port(listen, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {listen}: address in use or invalid")
        return server

    async def _set_health(self, status: Any) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_readiness(self, readiness: Callable[[], str | None]) -> None:
        """Health follows the components: NOT_SERVING while one cannot answer (the audit log
        refusing appends, or unable to append since its last append failed: a database that
        cannot be reached, the server lock not held), so a load balancer sends calls
        elsewhere instead of to a server that can only answer UNAVAILABLE."""
        serving = True
        while True:
            reason = await asyncio.to_thread(readiness)  # it may read the database
            if (reason is None) != serving:
                serving = reason is None
                status = health_pb2.HealthCheckResponse
                await self._set_health(status.SERVING if serving else status.NOT_SERVING)
                if serving:
                    log.info("server.ready_again")
                else:
                    log.critical("server.not_serving", reason=reason)
            await asyncio.sleep(READINESS_INTERVAL_S)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let calls in flight finish, close components."""
        if not self._servers or self._stopped.is_set():
            return
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        grace_s = self.settings.shutdown_grace_s if grace is None else grace
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))
        await self._close_components()
        self._stopped.set()
        log.info("server.stopped")

    async def _close_components(self) -> None:
        if self._on_stop is not None:
            result = self._on_stop()
            if asyncio.iscoroutine(result):
                await result

    async def wait(self) -> None:
        """Wait until the server is stopped."""
        await self._stopped.wait()


async def run(settings: Settings, *, banner: bool = True) -> None:
    """Run the service until SIGTERM or SIGINT (the ``centinela serve`` command)."""
    from centinela.server.wiring import build_application

    app = await build_application(settings)
    server = CentinelaServer(settings, app.servicers, on_stop=app.close, readiness=app.unready)
    port = await server.start()
    freeze_startup_heap()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    if banner:
        _print_banner(settings, port)
    await server.wait()


def freeze_startup_heap() -> None:
    """Exempt what start-up built from every later garbage collection (``gc.freeze``).

    Modules, the policy engine and the components live as long as the process, and each
    full collection walked them with the event loop stopped (43-59 ms a pause on this
    machine, about once a minute under MatchFace load). Frozen objects are still freed by
    reference counting; only reference cycles among them would never be collected, which
    is why this runs once, after a collection, when start-up is done (not in tests).
    """
    gc.collect()
    gc.freeze()
    log.info("server.heap_frozen", objects=gc.get_freeze_count())


def _print_banner(settings: Settings, port: int) -> None:
    host = settings.listen.rsplit(":", 1)[0]
    certs_dir = settings.effective_certs_dir
    mode = "PLAINTEXT (insecure-dev)" if settings.insecure_dev else "mutual TLS"
    lines = [
        f"Centinela {__version__} serving on {host}:{port} ({mode})",
        f"  data directory : {settings.data_dir.resolve()}",
        f"  database       : {_redact_url(settings.effective_database_url)}",
        f"  policy bundle  : {settings.policy_bundle}"
        + (f" (shadow: {settings.shadow_bundle})" if settings.shadow_bundle else ""),
    ]
    if not settings.insecure_dev:
        c = certs_dir.resolve()
        lines += [
            f"  certificates   : {c} (one client certificate per role)",
            "Try it:",
            f"  npx buf curl --protocol grpc --cacert {c}/ca.crt --cert {c}/compliance.crt "
            f"--key {c}/compliance.key https://127.0.0.1:{port}/grpc.health.v1.Health/Check",
        ]
    lines.append("Stop with Ctrl-C (graceful).")
    print("\n".join(lines), file=sys.stdout, flush=True)


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url

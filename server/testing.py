"""Run a real Centinela server in-process, on a loopback port, for tests and benchmarks.

The server runs its own asyncio loop in a background thread; callers use ordinary
synchronous gRPC channels with the development certificates, exactly like an external
client. Nothing is faked: real TLS, real database, real components.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from centinela.config import Settings
from centinela.server import certs
from centinela.server.app import CentinelaServer


@dataclasses.dataclass
class ServerThread:
    """A started server; use as a context manager or call ``stop()``."""

    settings: Settings
    build: Callable[[Settings], Any] | None = None
    #: Outside the server's own interceptor (a test's instruments).
    interceptors: Sequence[Any] = ()
    port: int = 0
    app: Any = None
    server: CentinelaServer | None = None

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        """Start the server; if it cannot start, what was built is closed and the loop
        stopped before the error is raised."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.port = fut.result(timeout=120)
        except BaseException:
            self.server = None  # nothing to stop gracefully
            self.stop()
            raise
        return self

    async def _start(self) -> int:
        if self.build is None:
            from centinela.server.wiring import build_application

            self.app = await build_application(self.settings)
        else:
            self.app = await self.build(self.settings)
        self.server = CentinelaServer(
            self.settings,
            self.app.servicers,
            on_stop=self.app.close,
            readiness=self.app.unready,
            extra_interceptors=self.interceptors,
        )
        return await self.server.start()  # closes the application if it cannot start

    def call(self, coro_fn: Callable[[], Any], timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(60)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def certs_dir(self) -> Path:
        return self.settings.effective_certs_dir

    def channel(self, identity: str = "muni-miraflores", **options: Any) -> grpc.Channel:
        """A mutual-TLS channel as the given development identity."""
        return secure_channel(self.target, certs.client_files(self.certs_dir, identity), **options)


def secure_channel(target: str, files: certs.TlsFiles, **options: Any) -> grpc.Channel:
    """A synchronous mutual-TLS channel with the given client material."""
    cert, key, ca = files.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    opts += list(options.items())
    return grpc.secure_channel(target, creds, options=opts)


def spawn_serving(
    argv: Sequence[str],
    port_file: Path,
    *,
    what: str = "server",
    timeout_s: float = 120.0,
    **popen: Any,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv`` (a server that writes its bound port to ``port_file`` once it serves)
    and return the process and that port.

    ``popen`` goes to :class:`subprocess.Popen` (``stderr``, ``cwd``, ``preexec_fn`` …).

    Raises:
        RuntimeError: the process exited, or did not serve within ``timeout_s``; it is
            killed in the second case.
    """
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(list(argv), **popen)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before serving")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not serve within {timeout_s:.0f} s")
        time.sleep(0.2)
    # write_text creates the file before it writes the number: an empty read is that instant.
    while not (text := port_file.read_text().strip()):
        time.sleep(0.05)
    return proc, int(text)


def cpu_s(pid: int, *, main_thread: bool = False) -> float:
    """CPU seconds (user + system) of process ``pid``: every thread of it, or with
    ``main_thread`` only the main one, which runs its event loop; 0.0 where ``/proc`` is not
    there (the figure is then left out)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """The CPU a process spends over one phase of a benchmark: made when the phase starts,
    :meth:`read` when it ends. Every thread counts (the event loop, the audit writer, the
    executor's searches, gRPC's own threads), or with ``main_thread`` the event loop's
    alone (:class:`LoopMeter`)."""

    def __init__(self, pid: int, *, main_thread: bool = False) -> None:
        self.pid = pid
        self.main_thread = main_thread
        self._cpu_s = cpu_s(pid, main_thread=main_thread)
        self._t0 = time.perf_counter()

    def read(self, answered: int) -> tuple[float, float]:
        """(ms of CPU per answered call, CPU seconds per second of the phase: the share of
        one core for the loop, cores for a whole process); NaN where it cannot be known
        (no ``/proc``, nothing answered)."""
        spent = cpu_s(self.pid, main_thread=self.main_thread) - self._cpu_s
        if not spent:
            return math.nan, math.nan
        per_call = 1000 * spent / answered if answered else math.nan
        return per_call, spent / (time.perf_counter() - self._t0)


class LoopMeter(CpuMeter):
    """The CPU a server's event loop spends over one phase of a benchmark (its main thread):
    ``read`` gives ms per answered call and the share of the phase the loop was busy."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid, main_thread=True)


def sectors_written(path: Path) -> int | None:
    """Sectors (512 bytes) written so far to the block device that holds ``path``, from
    ``/proc/diskstats``; None where that cannot be read (no ``/proc``, a device it does not
    list, such as an overlay or tmpfs)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        with open("/proc/diskstats") as stats:
            for line in stats:
                fields = line.split()
                if int(fields[0]) == major and int(fields[1]) == minor:
                    return int(fields[9])
    except OSError:
        return None
    return None


class CounterMeter:
    """What a counter of the machine rose by over one benchmark phase, per answered call:
    made when the phase starts, :meth:`read` when it ends. ``count`` reads the counter (None
    where it cannot), ``scale`` turns its units into the figure's."""

    def __init__(self, count: Callable[[], int | None], scale: float = 1.0) -> None:
        self._count = count
        self._scale = scale
        self._start = count()

    def read(self, answered: int) -> float:
        """The rise per answered call; NaN where it cannot be known."""
        end = self._count()
        if self._start is None or end is None or not answered:
            return math.nan
        return (end - self._start) * self._scale / answered


class DiskMeter(CounterMeter):
    """KB a benchmark phase wrote to the disk under ``path``, per answered call. It counts
    every writer of that device (the machine's own too), so it is read against a quiet
    machine or compared between alternating runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(lambda: sectors_written(path), scale=512 / 1024)


def audit_size(db: Path) -> int | None:
    """Entries in the audit log of the SQLite database ``db`` (read-only); None where it
    cannot be read."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        (size,) = conn.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return int(size)


class AuditMeter(CounterMeter):
    """Audit entries a benchmark phase added to a server's SQLite log, per answered call.
    Every worked MatchFace or stream probe adds its decision's entry before it is answered,
    so a figure under 1.0 says that answers were replayed from the idempotency store (a
    request id sent twice), not worked."""

    def __init__(self, db: Path) -> None:
        super().__init__(lambda: audit_size(db))


def bundle_variant(tmp: Path, base: str, patch: dict[str, Any]) -> Path:
    """A copy of a shipped bundle with ``centinela_config`` keys replaced (dotted paths)."""
    from centinela.policy.bundle import packaged_root

    target = tmp / f"{base}-variant"
    shutil.copytree(packaged_root() / base, target)
    data = json.loads((target / "data.json").read_text())
    for dotted, value in patch.items():
        node = data["centinela_config"]
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (target / "data.json").write_text(json.dumps(data, indent=1))
    return target


class TcpProxy:
    """A TCP relay to ``host:port`` on a loopback port, on its own event loop thread: a real
    network between a test's two ends, which the test can break.

    ``cut()`` aborts every relayed connection and stops listening (both ends see a reset,
    then new connections are refused, as when the server behind is down); ``restore()``
    listens again on the same port. ``freeze()`` silently drops everything the connections
    open at that moment carry, in both directions, and keeps them open (a peer that is gone
    without a word: a NAT entry expired, a cable pulled); connections made after it are
    relayed as usual. Each returns once done.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._live: set[asyncio.Event] = set()
        #: Connections relayed so far (each client connection counts once).
        self.connections = 0

    def _run(self, fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(30)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._run(self._listen)
        return self

    def cut(self) -> None:
        self._run(self._cut)

    def restore(self) -> None:
        self._run(self._listen)

    def freeze(self) -> None:
        self._run(self._freeze)

    def close(self) -> None:
        self._run(self._cut)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # RST to both ends
        self._open.clear()

    async def _freeze(self) -> None:
        for frozen in self._live:
            frozen.set()
        self._live.clear()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        frozen = asyncio.Event()
        self._live.add(frozen)
        self._open |= {client_w, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if frozen.is_set():
                        continue  # swallowed: the other end hears nothing, not even a close
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                if not frozen.is_set():  # a frozen peer does not even close: close() will
                    dst.transport.abort()
                    self._open.discard(dst)

        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))
        self._live.discard(frozen)


#: The source address :class:`HAProxy` checks that it listens from (any loopback address).
PROBE_SOURCE = "127.0.0.3"


class HAProxy:
    """HAProxy (the ``haproxy`` program) running ``config``, a file that takes the
    ``CENTINELA_LB_*`` environment variables of ``deploy/haproxy.cfg``: listening on a free
    port of every address (IPv6 and IPv4), forwarding to ``upstream`` and capping each
    source address at ``cap`` connections. A context manager; :attr:`port` is set once it
    listens."""

    def __init__(self, config: Path, upstream: str, cap: int, *, cpu: int | None = None) -> None:
        self.config, self.upstream, self.cap, self.cpu = config, upstream, cap, cpu
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("haproxy") is not None

    def __enter__(self) -> HAProxy:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
            self.port = int(s.getsockname()[1])
        env = {
            **os.environ,
            "CENTINELA_LB_BIND": f":::{self.port}",  # IPv6 and IPv4 (net.ipv6.bindv6only 0)
            "CENTINELA_LB_CAP": str(self.cap),
            "CENTINELA_UPSTREAM": self.upstream,
        }
        cpu = self.cpu
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"haproxy did not start: {err.strip()[:500]}")
            try:
                # From an address of its own: a connection counts against its source's cap
                # until HAProxy has seen it close, and 127.0.0.1 is the callers'.
                socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2, source_address=(PROBE_SOURCE, 0)
                ).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("haproxy did not listen within 10 s")

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

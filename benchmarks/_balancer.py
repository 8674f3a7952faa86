"""A per-source connection cap in front of the server, as ``deploy/README.md`` advises, for
``load.py --balancer-cap N``.

HAProxy in TCP mode (the TLS session, and so the client certificate, passes through to the
server untouched) admits at most ``cap`` connections at once from one source address and
closes the rest as soon as it has accepted them (``tcp-request connection reject`` on a
``conn_cur`` stick table, the HAProxy documentation's own example of a per-source limit).
On one machine every loopback connection comes from 127.0.0.1, and grpcio cannot bind a
client's source address (grpc/grpc#22511, #24035), so the well-behaved client runs in a
network namespace of its own joined by a veth pair: it reaches the balancer from
``NETNS_ADDR``, the flood from 127.0.0.1. Needs root, ``haproxy`` (Debian: haproxy) and
``ip`` (iproute2); nothing here runs in the test suite.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

NETNS = "centinela-probe"
HOST_IF, NETNS_IF = "cprobe-host", "cprobe-ns"
HOST_ADDR, NETNS_ADDR = "10.77.0.1", "10.77.0.2"

_CONFIG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend centinela
    bind 0.0.0.0:{port}
    stick-table type ip size 100k expire 60s store conn_cur
    tcp-request connection track-sc0 src
    tcp-request connection reject if {{ sc0_conn_cur gt {cap} }}
    default_backend server
backend server
    server centinela 127.0.0.1:{upstream}
"""


def missing() -> str | None:
    """What this machine lacks to run the balancer, or None."""
    if os.geteuid() != 0:
        return "--balancer-cap needs root (a network namespace for the probe client)"
    for tool, package in (("haproxy", "haproxy"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"--balancer-cap needs {tool} (Debian package {package})"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Balancer:
    """HAProxy capping connections per source at ``cap``, forwarding to ``upstream``, and
    the probe client's network namespace; both gone on exit."""

    def __init__(self, workdir: Path, upstream: int, cap: int, cpu: int | None = None):
        self.workdir, self.upstream, self.cap, self.cpu = workdir, upstream, cap, cpu
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    #: Prefix a command with this to run it in the probe client's namespace.
    exec_prefix = ["ip", "netns", "exec", NETNS]

    def __enter__(self) -> Balancer:
        self._namespace(up=True)
        config = self.workdir / "haproxy.cfg"
        config.write_text(_CONFIG.format(port=self.port, cap=self.cap, upstream=self.upstream))
        cpu = self.cpu
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"haproxy did not start: {err.strip()[:500]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise SystemExit("haproxy did not listen within 10 s")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self._namespace(up=False)

    @staticmethod
    def _namespace(*, up: bool) -> None:
        # Start clean: a namespace left by an interrupted run is removed first.
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
        if not up:
            return
        _ip("netns", "add", NETNS)
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NETNS_IF)
        _ip("link", "set", NETNS_IF, "netns", NETNS)
        _ip("addr", "add", f"{HOST_ADDR}/24", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        for args in (
            ("addr", "add", f"{NETNS_ADDR}/24", "dev", NETNS_IF),
            ("link", "set", NETNS_IF, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", NETNS, "ip", *args)

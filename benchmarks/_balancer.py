"""A per-source connection cap in front of the server, as ``deploy/README.md`` advises, for
``load.py --balancer-cap N``.

HAProxy runs ``deploy/haproxy.cfg``, the file a deployment runs: TCP mode (the TLS session,
and so the client certificate, passes through to the server untouched), at most ``cap``
connections at once from one source address, the rest closed as soon as they are accepted
(``tcp-request connection reject`` on a ``conn_cur`` stick table).
On one machine every loopback connection comes from 127.0.0.1, and grpcio cannot bind a
client's source address (grpc/grpc#22511, #24035), so the well-behaved client runs in a
network namespace of its own joined by a veth pair: it reaches the balancer from
``NETNS_ADDR``, the flood from 127.0.0.1. Needs root, ``haproxy`` (Debian: haproxy) and
``ip`` (iproute2). The test suite checks the same file without a namespace (IPv4 and IPv6
loopback are two sources): ``tests/reliability/test_balancer.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from centinela.server.testing import HAProxy

NETNS = "centinela-probe"
HOST_IF, NETNS_IF = "cprobe-host", "cprobe-ns"
HOST_ADDR, NETNS_ADDR = "10.77.0.1", "10.77.0.2"

#: The configuration a deployment runs (``CENTINELA_LB_*`` environment variables).
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"


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


class Balancer:
    """``deploy/haproxy.cfg`` capping connections per source at ``cap``, forwarding to
    ``upstream``, and the probe client's network namespace; both gone on exit."""

    #: Prefix a command with this to run it in the probe client's namespace.
    exec_prefix = ["ip", "netns", "exec", NETNS]

    def __init__(self, upstream: int, cap: int, cpu: int | None = None):
        self.haproxy = HAProxy(CONFIG, f"127.0.0.1:{upstream}", cap, cpu=cpu)
        self.port = 0

    def __enter__(self) -> Balancer:
        self._namespace(up=True)
        try:
            self.haproxy.__enter__()
        except RuntimeError as exc:
            self._namespace(up=False)
            raise SystemExit(str(exc)) from exc
        self.port = self.haproxy.port
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.haproxy.__exit__(kind, exc, tb)
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

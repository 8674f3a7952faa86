"""A PostgreSQL server of the test's own, which the test may stop, crash and start again.

The machine's PostgreSQL (127.0.0.1:5432) is shared by every other test and by other users of
the machine, so no test stops it. This one is the same PostgreSQL, started from the same
binaries on a data directory in a temporary folder and a free loopback port:

* ``stop("fast")`` is what stopping the service does (``systemctl stop postgresql``;
  ``pg_ctlcluster``'s default mode): open transactions are rolled back, every session is
  told ``terminating connection due to administrator command`` (SQLSTATE 57P01) before its
  socket closes, new connections are refused;
* ``stop("immediate")`` is a crash of the server: every process quits at once, and the next
  start replays the write-ahead log.

Run as root (as this machine's tests are), the server runs as the ``postgres`` account,
because PostgreSQL refuses to run as root.

Given a :class:`Netns`, the server runs in a network namespace of its own, reached over a
veth pair, so that the test can also partition the network between it and Centinela: every
packet dropped without a word, no reset and no ICMP, as when a link or a switch between two
hosts fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Netns:
    """A network namespace joined to this one by a veth pair: a host of its own at
    ``address``, with this one at the other end of a /30.

    :meth:`cut` takes the namespace's end of the link down: the kernel then drops every
    packet sent to it, silently (a partition); :meth:`mend` brings it up again, and
    connections that outlived the cut carry on. Needs root and iproute2.
    """

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            if os.environ.get("CI") == "true":
                pytest.fail("a network partition needs root and iproute2 in CI")
            pytest.skip("a network partition needs root and iproute2 (ip netns)")
        tag = secrets.token_hex(3)
        self.name = f"cpg{tag}"
        self._here, self._there = f"cpg{tag}h", f"cpg{tag}n"
        octet = 100 + secrets.randbelow(150)
        net = f"10.{octet}.{secrets.randbelow(256)}"
        self.local, self.address = f"{net}.1", f"{net}.2"
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self._here, "type", "veth", "peer", "name", self._there)
            self._ip("link", "set", self._there, "netns", self.name)
            self._ip("addr", "add", f"{self.local}/30", "dev", self._here)
            self._ip("link", "set", self._here, "up")
            self._ip("addr", "add", f"{self.address}/30", "dev", self._there, inside=True)
            self._ip("link", "set", self._there, "up", inside=True)
            self._ip("link", "set", "lo", "up", inside=True)
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def _ip(self, *args: str, inside: bool = False) -> None:
        cmd = [*(self.prefix if inside else []), "ip", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"

    def cut(self) -> None:
        self._ip("link", "set", self._there, "down", inside=True)

    def mend(self) -> None:
        self._ip("link", "set", self._there, "up", inside=True)

    def close(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it this end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self._here], capture_output=True, check=False)


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder, on a loopback port of its own (or, given
    a :class:`Netns`, on the namespace's address)."""

    def __init__(self, netns: Netns | None = None) -> None:
        self.netns = netns
        self.host = netns.address if netns else "127.0.0.1"
        bindir = _bindir()
        if bindir is None:
            if os.environ.get("CI") == "true":
                pytest.fail("PostgreSQL's server binaries (pg_ctl, initdb) are required in CI")
            pytest.skip("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
        self.bindir = bindir
        self._as: list[str] = []
        uid = -1
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres").pw_uid
            self._as = ["runuser", "-u", "postgres", "--"]
        # Not under pytest's tmp_path: its parents are private to root, and the server runs
        # as another account.
        self.root = Path(tempfile.mkdtemp(prefix="centinela-pg-"))
        self.root.chmod(0o755)
        if uid >= 0:
            os.chown(self.root, uid, -1)
        self.data = self.root / "data"
        self.port = _free_port()
        self.running = False
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        if netns is not None:  # initdb trusts loopback only
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {netns.local}/32 trust\n")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its ``postgres`` database, over TCP."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        inside = self.netns.prefix if self.netns else []
        out = subprocess.run(
            [*inside, *self._as, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert out.returncode == 0, f"{tool} failed: {out.stdout}\n{out.stderr}\n{self.log()}"

    def log(self) -> str:
        """What the server wrote to its log so far."""
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses={self.host} -k {self.root} "
            "-c max_connections=50 -c shared_buffers=16MB"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: as the service is stopped; ``immediate``: a crash) and
        return once every process of it has ended."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

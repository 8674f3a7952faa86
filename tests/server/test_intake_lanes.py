"""``intake_lanes``: one port bound by several gRPC servers that share the service.

The fairness this buys under a flood is in ``tests/reliability/test_overload.py``; here, the
mechanics: every lane answers over mutual TLS with the same components, a port another
process listens on is refused before any lane binds, and stopping the server closes them all.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.server.app import reserve_port
from centinela.server.testing import ServerThread

LOCAL_POOL = "grpc.use_local_subchannel_pool"


def _settings(tmp_path: Path, lanes: int, listen: str = "127.0.0.1:0") -> Settings:
    return Settings(
        data_dir=tmp_path / "data", listen=listen, intake_lanes=lanes, shutdown_grace_s=1.0
    )


def test_every_connection_is_answered_by_a_lane_and_stop_closes_all(tmp_path: Path) -> None:
    with ServerThread(_settings(tmp_path, lanes=4)) as server:
        assert server.server is not None
        assert server.server.lanes == 4
        # Twelve connections (one subchannel each), which the kernel spreads over the lanes
        # by their addresses: a lane that could not answer would fail some of them (all
        # twelve on one lane is a 1 in 4^11 chance).
        for _ in range(12):
            with server.channel("compliance", **{LOCAL_POOL: 1}) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        port = server.port
    with socket.socket() as probe:  # no lane listens any more
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_port_another_process_listens_on_is_refused(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that shares
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1"):
            reserve_port(taken)
        with pytest.raises(ConfigError, match="cannot listen on"):
            ServerThread(_settings(tmp_path, lanes=2, listen=taken)).start()


def test_reserve_port_picks_a_free_port_for_port_zero() -> None:
    port = reserve_port("127.0.0.1:0")
    assert port > 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and leaves it free


def test_lanes_below_one_are_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="intake_lanes"):
        ServerThread(_settings(tmp_path, lanes=0)).start()


def test_one_lane_binds_without_sharing_the_port(tmp_path: Path) -> None:
    with ServerThread(_settings(tmp_path, lanes=1)) as server:
        assert server.server is not None
        assert server.server.lanes == 1
        with socket.socket() as other:  # SO_REUSEPORT cannot join a socket that lacks it
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", server.port))
        with server.channel("compliance") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

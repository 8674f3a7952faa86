"""The load balancer stanza a deployment runs (``deploy/haproxy.cfg``), in front of a real
server: TLS passes through (the server still sees each client's certificate) and each
source address holds at most the cap of connections at once (issue 9, point 5: under a
unary flood a well-behaved client's wait follows the streams the flood holds open, which
this cap bounds; ``benchmarks/load.py --balancer-cap`` measures the latency it buys).

IPv4 and IPv6 loopback are two source addresses on one machine, so no network namespace is
needed here. Skipped where HAProxy is not installed (Debian package ``haproxy``).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from centinela.config import Settings
from centinela.server import certs
from centinela.server.testing import HAProxy, ServerThread, secure_channel
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1.match_service_pb2_grpc import MatchServiceStub

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"

pytestmark = pytest.mark.skipif(
    not HAProxy.available(),
    reason="haproxy is not installed (Debian package haproxy): deploy/haproxy.cfg untested",
)


def test_the_balancer_passes_mtls_through_and_caps_connections_per_source(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", shutdown_grace_s=1.0)
    with (
        ServerThread(settings) as server,
        HAProxy(CONFIG, f"127.0.0.1:{server.port}", cap=1) as balancer,
    ):
        files = certs.client_files(server.certs_dir, "muni-miraflores")
        opened: list[grpc.Channel] = []

        def server_info(host: str) -> tuple[grpc.Channel, mpb.GetServerInfoResponse]:
            # A connection of its own per channel, as separate clients hold them.
            channel = secure_channel(
                f"{host}:{balancer.port}", files, **{"grpc.use_local_subchannel_pool": 1}
            )
            opened.append(channel)
            try:
                answer = MatchServiceStub(channel).GetServerInfo(
                    mpb.GetServerInfoRequest(), timeout=10
                )
            except grpc.RpcError:
                channel.close()  # a refused channel must not take the slot when it frees
                raise
            return channel, answer

        try:
            # A protected call answered through the balancer: the server saw the certificate.
            first, answer = server_info("127.0.0.1")
            assert answer.version
            # A second connection from the same address while the first is open: closed.
            with pytest.raises(grpc.RpcError) as refused:
                server_info("127.0.0.1")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # Another source address has a cap of its own.
            server_info("[::1]")
            # The first connection gone, its address may connect again.
            first.close()
            deadline = time.monotonic() + 10
            while True:
                try:
                    server_info("127.0.0.1")
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            for channel in opened:
                channel.close()

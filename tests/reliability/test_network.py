"""A connection that dies without a word under an open StreamMatch: the client finds out.

A portico keeps one StreamMatch open all day and is idle between captures. If the network
drops the connection silently (a NAT entry expires, a link is cut: no FIN, no RST), nothing
arrives to end the stream: without HTTP/2 keepalive pings the client waits on it, idle,
indefinitely, and with a probe sent until TCP gives up retransmitting (about fifteen
minutes), while its probes go unanswered. The fault here is real: the
client reaches the server through a TCP relay (``TcpProxy``) that, on ``freeze()``, swallows
everything the open connection carries in both directions and keeps it open.

With the client's keepalive the stream ends with UNAVAILABLE (which the portico answers by
reconnecting, ``tests/clients/test_portico.py``), and a new stream through the same relay is
answered. With keepalive off, the same stream is still silent seconds later: the control
that shows the pings, not something else, end it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from centinela.clients.client import CentinelaClient
from centinela.clients.errors import ClientError
from centinela.server.demo import World, serving_world
from centinela.server.testing import TcpProxy
from centinela.v1 import match_service_pb2 as mpb


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_world(tmp_path_factory.mktemp("net"), registry=False) as w:
        yield w


class Stream:
    """One StreamMatch through ``client``, fed from a queue, read by a thread that records
    every answer and how the stream ended."""

    def __init__(self, client: CentinelaClient) -> None:
        self._out: queue.Queue[mpb.StreamMatchRequest | None] = queue.Queue()
        self.answers: queue.Queue[mpb.StreamMatchResponse] = queue.Queue()
        self.ended = threading.Event()
        self.error: ClientError | None = None
        self._thread = threading.Thread(target=self._read, args=(client,), daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[mpb.StreamMatchRequest]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read(self, client: CentinelaClient) -> None:
        try:
            for answer in client.stream_match(self._requests()):
                self.answers.put(answer)
        except ClientError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def ask(self, w: World, sequence: int) -> mpb.StreamMatchResponse:
        self._out.put(mpb.StreamMatchRequest(sequence=sequence, face=w.face_request(w.stranger())))
        return self.answers.get(timeout=30)

    def close(self) -> None:
        self._out.put(None)


def _client(w: World, proxy: TcpProxy, keepalive_s: float) -> CentinelaClient:
    return CentinelaClient.from_data_dir(
        w.server.settings.data_dir,
        "muni-miraflores",
        server=f"127.0.0.1:{proxy.port}",
        keepalive_s=keepalive_s,
        keepalive_timeout_s=1.0,
    )


def test_keepalive_ends_a_stream_whose_connection_died_silently(world: World) -> None:
    proxy = TcpProxy("127.0.0.1", world.server.port).start()
    client = _client(world, proxy, keepalive_s=1.0)
    try:
        stream = Stream(client)
        assert stream.ask(world, 1).WhichOneof("result") == "face"  # the stream works
        proxy.freeze()
        # One keepalive interval and one unanswered ping later (2 s); 30 s is only the bound
        # past which the test calls it a hang.
        assert stream.ended.wait(30), "the stream hung on a dead connection"
        assert stream.error is not None
        assert stream.error.code == grpc.StatusCode.UNAVAILABLE
        # The client reconnects (the relay passes new connections) and is answered again.
        again = Stream(client)
        assert again.ask(world, 2).WhichOneof("result") == "face"
        again.close()
        assert again.ended.wait(30)
        assert proxy.connections == 2
    finally:
        client.close()
        proxy.close()


def test_without_keepalive_the_same_stream_hangs(world: World) -> None:
    """The control: the protection removed, the frozen stream is still silent seconds
    after the keepalive run above had ended it."""
    proxy = TcpProxy("127.0.0.1", world.server.port).start()
    client = _client(world, proxy, keepalive_s=0)
    try:
        stream = Stream(client)
        assert stream.ask(world, 1).WhichOneof("result") == "face"
        proxy.freeze()
        assert not stream.ended.wait(5)  # more than twice what keepalive needed
    finally:
        proxy.close()  # resets both ends: the stream ends now
        assert stream.ended.wait(30)
        client.close()


def test_the_server_lets_an_idle_stream_be_pinged_at_the_client_s_pace(
    world: World, tmp_path: Path
) -> None:
    """Pings every ``KEEPALIVE_S`` on an open, idle stream are within what the server
    accepts: gRPC's default (one ping per 5 minutes without data) would close such a
    portico's connection with GOAWAY after two pings. Paced here at the server's minimum
    (10 s), for three pings."""
    proxy = TcpProxy("127.0.0.1", world.server.port).start()
    client = _client(world, proxy, keepalive_s=10.0)
    try:
        stream = Stream(client)
        assert stream.ask(world, 1).WhichOneof("result") == "face"
        assert not stream.ended.wait(35)  # idle; three pings came and went
        assert stream.ask(world, 2).WhichOneof("result") == "face"
        stream.close()
        assert stream.ended.wait(30)
        assert stream.error is None
        assert proxy.connections == 1  # the same connection all along
    finally:
        client.close()
        proxy.close()

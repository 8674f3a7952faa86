"""R11 at the edge: what the edge agent sends is embeddings and context, never image bytes.

A real gRPC client interceptor records every serialized message the client puts on the wire,
for unary calls and for the StreamMatch stream; the server is a real one over mutual TLS.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from centinela.clients.client import CentinelaClient
from centinela.clients.edge_cli import match_images
from centinela.clients.encoder import FaceEncoder, load_image
from centinela.clients.errors import ClientError
from centinela.clients.portico import Portico
from centinela.server.testing import ServerThread
from centinela.v1 import match_service_pb2

pytestmark = pytest.mark.edge

#: A MatchFaceRequest is 512 floats (2 KiB) plus context; an image is far larger.
MAX_PROBE_BYTES = 4096


class WireTap(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Records the serialized bytes of every request message sent."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.messages.append((details.method, request.SerializeToString()))
        return continuation(details, request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        def tap(items: Iterator[Any]) -> Iterator[Any]:
            for item in items:
                self.messages.append((details.method, item.SerializeToString()))
                yield item

        return continuation(details, tap(requests))


def _assert_no_image_bytes(messages: list[tuple[str, bytes]], images: list[Path]) -> None:
    for method, raw in messages:
        assert len(raw) <= MAX_PROBE_BYTES, method
        # JPEG start of image and its first marker: 4 bytes, so a float vector cannot hold
        # it by chance (a 3-byte needle would, once in a few hundred runs).
        assert re.search(rb"\xff\xd8\xff[\xc0-\xfe]", raw) is None
        assert b"\x89PNG" not in raw
        for path in images:
            blob = path.read_bytes()
            # No 32-byte run of the file, sampled along its length, appears in the message.
            for offset in range(0, len(blob) - 32, max(1, len(blob) // 64)):
                assert blob[offset : offset + 32] not in raw
            pixels = load_image(path)
            # Nor a row of raw pixels.
            middle = pixels[pixels.shape[0] // 2, :32].tobytes()
            assert middle not in raw


def test_match_face_sends_only_embeddings(
    server: ServerThread, encoder: FaceEncoder, photos: dict[str, Path]
) -> None:
    tap = WireTap()
    images = [photos["yaoming"], photos["gdp"]]
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target, interceptors=[tap]
    ) as client:
        for image in images:
            # The site is not registered on this server, so the calls may be refused: they
            # were sent all the same, which is what this test inspects.
            with contextlib.suppress(ClientError):
                match_images(client, encoder, [image], site_id="mira-cam-07")
    face_calls = [raw for method, raw in tap.messages if method.endswith("/MatchFace")]
    assert len(face_calls) >= 2
    for raw in face_calls:
        request = match_service_pb2.MatchFaceRequest.FromString(raw)
        assert len(request.probe.vector) == 512
        assert abs(float(np.linalg.norm(request.probe.vector)) - 1.0) < 1e-3
        assert request.probe.model_id == encoder.model_id
        # Only known fields: nothing smuggled in unknown fields either.
        assert request.ByteSize() == len(raw)
    _assert_no_image_bytes(tap.messages, images)


def test_portico_stream_sends_only_embeddings(
    server: ServerThread, encoder: FaceEncoder, photos: dict[str, Path], tmp_path: Path
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    target = frames / "cam-0001.jpg"
    target.write_bytes(photos["t1"].read_bytes())
    tap = WireTap()
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target, interceptors=[tap]
    ) as client:
        portico = Portico(client, encoder, frames, site_id="mira-cam-07", settle=0.0)
        portico.run(once=True, drain_timeout=60)
    sent = [raw for method, raw in tap.messages if method.endswith("/StreamMatch")]
    assert len(sent) == portico.counts.probes == 6
    for raw in sent:
        msg = match_service_pb2.StreamMatchRequest.FromString(raw)
        assert msg.WhichOneof("probe") == "face"
        assert len(msg.face.probe.vector) == 512
    _assert_no_image_bytes(tap.messages, [target])

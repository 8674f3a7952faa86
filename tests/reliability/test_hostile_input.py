"""Hostile input against the live server (issue 9, point 3, in part): random bytes and
randomised malformed messages on every unary RPC of the four services. The server never
answers INTERNAL or UNKNOWN, never crashes, and stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centinela.config import Settings
from centinela.server.testing import ServerThread
from centinela.v1 import (
    audit_service_pb2,
    common_pb2,
    match_service_pb2,
    registry_service_pb2,
    watchlist_service_pb2,
)

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNIMPLEMENTED,
}


def _unary_methods() -> list[str]:
    paths = []
    for module in (
        match_service_pb2,
        watchlist_service_pb2,
        registry_service_pb2,
        audit_service_pb2,
    ):
        for svc in module.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                if not m.client_streaming and not m.server_streaming:
                    paths.append(f"/{svc.full_name}/{m.name}")
    return paths


METHODS = _unary_methods()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Any]]:
    s = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"), listen="127.0.0.1:0", shutdown_grace_s=0.5
    )
    with ServerThread(s) as server:
        ch = server.channel("pnp-investigator")
        yield server, ch
        ch.close()


def _code(ch: Any, path: str, payload: bytes) -> grpc.StatusCode:
    call = ch.unary_unary(path)
    try:
        call(payload, timeout=20)
    except grpc.RpcError as err:
        code: grpc.StatusCode = cast(Any, err).code()
        return code
    return grpc.StatusCode.OK


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(METHODS), payload=st.binary(max_size=2048))
def test_random_bytes_get_a_proper_status(
    live: tuple[ServerThread, Any], path: str, payload: bytes
) -> None:
    _server, ch = live
    assert _code(ch, path, payload) in ACCEPTABLE


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.just(float("nan")),
    st.just(float("inf")),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dim=st.sampled_from([0, 1, 511, 512, 513, 4096, 20_000]),
    value=floats,
    purpose=st.integers(min_value=-5, max_value=50),
    mode=st.integers(min_value=-3, max_value=9),
    gallery=st.integers(min_value=-3, max_value=9),
    text=st.text(max_size=300),
    quality=floats,
)
def test_malformed_match_face_gets_a_proper_status(
    live: tuple[ServerThread, Any],
    dim: int,
    value: float,
    purpose: int,
    mode: int,
    gallery: int,
    text: str,
    quality: float,
) -> None:
    _server, ch = live
    req = match_service_pb2.MatchFaceRequest(
        context=common_pb2.RequestContext(
            purpose=cast(Any, purpose),
            site_id=text[:200],
            operator_id=text,
            client_request_id=text[:200],
            legal_basis=text,
        ),
        probe=common_pb2.FaceProbe(model_id=text, vector=[value] * dim, quality=quality),
        galleries=[cast(Any, gallery)],
        mode=cast(Any, mode),
    )
    assert _code(ch, "/centinela.v1.MatchService/MatchFace", req.SerializeToString()) in ACCEPTABLE


def test_server_is_still_healthy_after_the_fuzzing(live: tuple[ServerThread, Any]) -> None:
    _server, ch = live
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING

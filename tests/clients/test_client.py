"""CentinelaClient against a real server over mutual TLS: identity, retries, idempotency, errors.

The only stand-in is :class:`Recorder`, a real gRPC client interceptor that records what each
attempt sends (and, for the retry test, starts the server between two attempts so that the
test does not depend on timing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from centinela.clients import builders
from centinela.clients.calls import prepare
from centinela.clients.client import CentinelaClient
from centinela.clients.errors import ClientError, from_error_status
from centinela.clients.retry import RetryPolicy
from centinela.clients.tls import TlsMaterial
from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.server import certs
from centinela.server.testing import ServerThread
from centinela.v1 import audit_service_pb2, common_pb2, match_service_pb2

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


class Recorder(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Records (method, metadata, serialized request) of every attempt."""

    def __init__(self, before_attempt: Callable[[int], None] | None = None) -> None:
        self.attempts: list[tuple[str, dict[str, str], bytes]] = []
        self.before_attempt = before_attempt

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.attempts.append(
            (details.method, dict(details.metadata or ()), request.SerializeToString())
        )
        if self.before_attempt is not None:
            self.before_attempt(len(self.attempts))
        return continuation(details, request)

    def _spy(self, details: Any, items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            self.attempts.append(
                (details.method, dict(details.metadata or ()), item.SerializeToString())
            )
            yield item

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, self._spy(details, requests))

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, self._spy(details, requests))

    def sent(self, method_suffix: str) -> list[bytes]:
        return [raw for method, _m, raw in self.attempts if method.endswith(method_suffix)]


def _face_request(model_id: str, site: str = "mira-cam-07") -> match_service_pb2.MatchFaceRequest:
    vector = np.random.default_rng(3).normal(size=512).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return builders.match_face_request(builders.face_probe(vector, model_id, 0.9), site_id=site)


# ---- identity and TLS -------------------------------------------------------------------------


def test_client_from_data_dir_is_the_named_identity(server: ServerThread) -> None:
    data_dir = server.settings.data_dir
    with CentinelaClient.from_data_dir(data_dir, "pnp-officer", server=server.target) as client:
        info = client.server_info()
        assert (info.caller_org, info.caller_kind) == ("pnp-lima", "pnp")
        assert list(info.caller_roles) == ["officer"]
        assert client.health()


def test_client_from_files(server: ServerThread) -> None:
    files = certs.client_files(server.certs_dir, "compliance")
    with CentinelaClient(server.target, cert=files.cert, key=files.key, ca=files.ca) as client:
        assert client.server_info().caller_kind == "compliance"


def test_unknown_identity_says_how_to_fix_it(server: ServerThread) -> None:
    with pytest.raises(ConfigError) as err:
        CentinelaClient.from_data_dir(server.settings.data_dir, "muni-lince", server=server.target)
    text = err.value.diagnostics()
    assert "centinela certs init" in text
    assert "muni-miraflores" in text  # lists the identities that exist


def test_missing_tls_material_is_refused_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--cert, --key and --ca"):
        CentinelaClient("127.0.0.1:1", cert=tmp_path / "a.crt")
    with pytest.raises(ConfigError, match="does not exist"):
        TlsMaterial.from_files(tmp_path / "a.crt", tmp_path / "a.key", tmp_path / "ca.crt")


def test_tls_material_repr_never_shows_the_key(server: ServerThread) -> None:
    tls = TlsMaterial.from_data_dir(server.settings.data_dir, "pnp-admin")
    assert b"PRIVATE KEY" in tls.key
    assert "PRIVATE" not in repr(tls)


def test_a_server_signed_by_another_ca_is_not_trusted(server: ServerThread, tmp_path: Path) -> None:
    """Attack: a man in the middle with its own CA. The client must refuse it."""
    other = tmp_path / "other-ca"
    certs.init_dev_pki(other)
    own = certs.client_files(server.certs_dir, "muni-miraflores")
    with (
        CentinelaClient(
            server.target,
            cert=own.cert,
            key=own.key,
            ca=other / "ca.crt",
            retry=RetryPolicy(max_attempts=1),
            timeout=5,
        ) as client,
        pytest.raises(ClientError) as err,
    ):
        client.server_info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---- retries and idempotency ------------------------------------------------------------------


def test_unavailable_is_retried_until_the_server_is_up(tmp_path: Path, free_port: int) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", listen=f"127.0.0.1:{free_port}", shutdown_grace_s=1.0
    )
    certs.init_dev_pki(settings.effective_certs_dir)  # the server keeps this PKI
    started: list[ServerThread] = []

    def start_on_third_attempt(attempt: int) -> None:
        if attempt == 3:
            started.append(ServerThread(settings).start())

    recorder = Recorder(start_on_third_attempt)
    try:
        with CentinelaClient.from_data_dir(
            settings.data_dir,
            "muni-miraflores",
            server=f"127.0.0.1:{free_port}",
            retry=RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.3),
            timeout=60,
            interceptors=[recorder],
        ) as client:
            info = client.server_info()
    finally:
        for srv in started:
            srv.stop()
    assert info.caller_org == "muni-miraflores"
    # Attempts 1-2 met no server; the call succeeded on a later attempt (how many depends on
    # when the channel reconnects, bounded by the policy).
    assert 3 <= len(recorder.attempts) <= 20


def test_retries_are_bounded(free_port: int, server: ServerThread) -> None:
    recorder = Recorder()
    with (
        CentinelaClient.from_data_dir(
            server.settings.data_dir,
            "muni-miraflores",
            server=f"127.0.0.1:{free_port}",  # nobody listens there
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02),
            interceptors=[recorder],
        ) as client,
        pytest.raises(ClientError) as err,
    ):
        client.match_face(_face_request("w600k_mbf:0"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(recorder.attempts) == 3
    assert "centinela serve" in err.value.hint


def test_the_deadline_bounds_retries(free_port: int, server: ServerThread) -> None:
    """A backoff that would end after the deadline is not waited for: one attempt only."""
    recorder = Recorder()
    with (
        CentinelaClient.from_data_dir(
            server.settings.data_dir,
            "muni-miraflores",
            server=f"127.0.0.1:{free_port}",
            retry=RetryPolicy(max_attempts=10, initial_backoff=60, max_backoff=60, jitter=0),
            timeout=2,
            interceptors=[recorder],
        ) as client,
        pytest.raises(ClientError),
    ):
        client.server_info()
    assert len(recorder.attempts) == 1


def test_all_attempts_of_one_call_share_one_client_request_id(
    free_port: int, server: ServerThread
) -> None:
    recorder = Recorder()
    with CentinelaClient.from_data_dir(
        server.settings.data_dir,
        "muni-miraflores",
        server=f"127.0.0.1:{free_port}",
        retry=FAST,
        interceptors=[recorder],
    ) as client:
        request = _face_request("w600k_mbf:0")
        for _ in range(2):
            with pytest.raises(ClientError):
                client.match_face(request)
    ids = [
        match_service_pb2.MatchFaceRequest.FromString(raw).context.client_request_id
        for raw in recorder.sent("/MatchFace")
    ]
    assert len(ids) == 2 * FAST.max_attempts
    first, second = ids[: FAST.max_attempts], ids[FAST.max_attempts :]
    assert len(set(first)) == 1
    assert len(set(second)) == 1
    assert first[0] != second[0]  # a new logical call gets a new id
    assert request.context.client_request_id == ""  # the caller's message is untouched
    headers = [m.get("x-request-id") for _meth, m, _r in recorder.attempts]
    assert headers == ids  # the server logs the call under the same id


def test_an_id_given_by_the_caller_is_kept(server: ServerThread) -> None:
    recorder = Recorder()
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target, interceptors=[recorder]
    ) as client:
        request = _face_request("w600k_mbf:0")
        request.context.client_request_id = "edge-0001:frame-000042"
        with pytest.raises(ClientError):
            client.match_face(request)
    sent = match_service_pb2.MatchFaceRequest.FromString(recorder.sent("/MatchFace")[0])
    assert sent.context.client_request_id == "edge-0001:frame-000042"


def test_answers_other_than_unavailable_are_not_retried(server: ServerThread) -> None:
    recorder = Recorder()
    with (
        CentinelaClient.from_data_dir(
            server.settings.data_dir,
            "muni-miraflores",
            server=server.target,
            retry=FAST,
            interceptors=[recorder],
        ) as client,
        pytest.raises(ClientError) as err,
    ):
        client.match_face(_face_request("another-model:0123456789abcdef"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(recorder.attempts) == 1


# ---- error decoding ---------------------------------------------------------------------------


def test_error_details_are_decoded(server: ServerThread) -> None:
    recorder = Recorder()
    with (
        CentinelaClient.from_data_dir(
            server.settings.data_dir,
            "muni-miraflores",
            server=server.target,
            interceptors=[recorder],
        ) as client,
        pytest.raises(ClientError) as err,
    ):
        client.match_face(_face_request("another-model:0123456789abcdef"))
    e = err.value
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.status == "FAILED_PRECONDITION"
    assert e.field == "probe.model_id"
    assert e.reason == "ModelMismatch"
    assert e.request_id == recorder.attempts[0][1]["x-request-id"]
    assert e.diagnostics().startswith("FAILED_PRECONDITION: probe.model_id")
    doc = e.to_dict()
    assert doc["field"] == "probe.model_id"
    assert doc["hint"]


def test_invalid_argument_names_the_field(server: ServerThread) -> None:
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target
    ) as client:
        request = _face_request(client.server_info().galleries[0].model_id)
        del request.probe.vector[10:]
        with pytest.raises(ClientError) as err:
            client.match_face(request)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == "probe.vector"


def test_policy_denial_carries_rule_ids_and_decision_id(server: ServerThread) -> None:
    """A municipality asking for the Reniec registry is denied by R2, and the denial is
    audited: the decision id comes back with the rule ids."""
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "muni-miraflores", server=server.target
    ) as client:
        request = _face_request(client.server_info().galleries[0].model_id)
        request.galleries.append(common_pb2.GALLERY_RENIEC_REGISTRY)
        with pytest.raises(ClientError) as err:
            client.match_face(request)
    e = err.value
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    assert "R2" in e.rule_ids
    assert e.decision_id
    assert e.decision_id.startswith("dec_")
    assert "LEGAL_RULES" in e.hint


def test_stream_error_status_is_decoded() -> None:
    status = common_pb2.ErrorStatus(
        code=7, message="denied by policy: R5", field="", rule_ids=["R5"], decision_id="dec_1"
    )
    err = from_error_status(status)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.rule_ids == ("R5",)
    assert err.decision_id == "dec_1"


# ---- request preparation (pure) --------------------------------------------------------------


def test_prepare_fills_ids_and_operator_on_a_copy() -> None:
    request = _face_request("m:0")
    sent, rid = prepare(request, operator_id="op-0001")
    assert rid
    assert sent.context.client_request_id == rid
    assert sent.context.operator_id == "op-0001"
    assert request.context.client_request_id == ""
    assert request.context.operator_id == ""
    _info, none = prepare(match_service_pb2.GetServerInfoRequest())
    assert none == ""


def test_every_rpc_of_the_four_services_has_a_method() -> None:
    from centinela.v1 import registry_service_pb2, watchlist_service_pb2

    def snake(name: str) -> str:
        return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")

    missing = []
    for module in (
        match_service_pb2,
        watchlist_service_pb2,
        registry_service_pb2,
        audit_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if not callable(getattr(CentinelaClient, snake(method.name), None)):
                    missing.append(method.name)
    assert missing == []


@given(
    retry=st.integers(min_value=1, max_value=40),
    rand=st.floats(min_value=0.0, max_value=1.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_grows_exponentially_within_its_bounds(
    retry: int, rand: float, jitter: float
) -> None:
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=5.0, multiplier=2.0, jitter=jitter)
    base = min(5.0, 0.2 * 2.0 ** (retry - 1))
    wait = policy.backoff(retry, lambda: rand)
    assert base * (1 - jitter) - 1e-9 <= wait <= base + 1e-9
    assert wait <= policy.max_backoff


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2.0)


def test_pages_follow_the_next_page_token(server: ServerThread) -> None:
    from centinela.v1 import watchlist_service_pb2 as wpb

    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "pnp-admin", server=server.target, operator_id="op-pnp-admin-01"
    ) as admin:
        for i in range(3):
            admin.register_site(
                wpb.RegisterSiteRequest(
                    context=builders.request_context(reference="RES-2026-0042"),
                    site=wpb.Site(
                        site_id=f"mira-cam-{i:02d}",
                        municipality="muni-miraflores",
                        region="lima",
                        kind=wpb.SITE_KIND_CAMERA,
                    ),
                )
            )
        pages = list(admin.pages(admin.list_sites, wpb.ListSitesRequest(page_size=1)))
    assert len(pages) == 3
    assert [p.sites[0].site_id for p in pages] == ["mira-cam-00", "mira-cam-01", "mira-cam-02"]
    assert pages[-1].next_page_token == ""


def test_import_templates_streams_a_list_and_stamps_the_first_batch(server: ServerThread) -> None:
    from centinela.v1 import registry_service_pb2 as rpb

    recorder = Recorder()
    with CentinelaClient.from_data_dir(
        server.settings.data_dir,
        "reniec",
        server=server.target,
        operator_id="op-reniec-000001",
        interceptors=[recorder],
    ) as client:
        model_id = client.server_info().galleries[0].model_id
        vectors = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        batches = [
            rpb.ImportTemplatesRequest(
                context=builders.request_context(reference="RJ-2026-000001"),
                batch_number=0,
                records=[
                    rpb.RegistryRecord(dni=f"7000000{i}", model_id=model_id, vector=v.tolist())
                    for i, v in enumerate(vectors)
                ],
            )
        ]
        first = client.import_templates(batches)
        again = client.import_templates(batches)
    assert (first.received, first.accepted) == (3, 3)
    assert (again.received, again.unchanged) == (3, 3)  # re-sending changes nothing
    assert batches[0].context.client_request_id == ""  # the caller's batches are untouched
    sent = [rpb.ImportTemplatesRequest.FromString(r) for r in recorder.sent("/ImportTemplates")]
    assert len(sent) == 2
    assert sent[0].context.client_request_id != sent[1].context.client_request_id
    assert first.decision.decision_id != again.decision.decision_id  # two logical calls


def test_export_entries_streams_the_audit_log_in_order(server: ServerThread) -> None:
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "compliance", server=server.target, operator_id="op-audit-000001"
    ) as client:
        for _ in range(3):
            client.server_info()
        checkpoint = client.get_checkpoint(
            audit_service_pb2.GetCheckpointRequest(context=builders.request_context())
        )
        chunks = list(
            client.export_entries(
                audit_service_pb2.ExportEntriesRequest(context=builders.request_context())
            )
        )
    indexes = [e.index for chunk in chunks for e in chunk.events]
    assert indexes == list(range(len(indexes)))
    assert len(indexes) >= 1
    assert chunks[-1].signed_note
    assert checkpoint.tree_size >= 1


def test_request_ids_lead_with_their_time_and_stay_unique() -> None:
    before = time.time_ns() // 1_000_000
    ids = [builders.new_request_id() for _ in range(500)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 500
    for rid in ids:
        assert len(rid) == 32
        int(rid, 16)  # hex digits only
        # The first 12 digits are the milliseconds it was made at: in creation order, which
        # is what keeps the server's index on them cheap to grow.
        assert before <= int(rid[:12], 16) <= after

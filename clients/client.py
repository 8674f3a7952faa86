"""The typed Centinela client that every command line tool of the project uses.

``CentinelaClient`` wraps the generated stubs of the four services over one mutual-TLS
channel. Each RPC has a thin method that takes the generated request message and returns the
generated response (helpers to build requests are in ``centinela.clients.builders``). On top
of the stubs it adds what every caller needs and should not re-invent:

* TLS material from files, or from a data directory's development identities by name;
* a default deadline per call (``timeout``; streams have none unless given);
* retries with exponential backoff and jitter for UNAVAILABLE only, bounded by attempts and
  by the deadline, reusing one ``client_request_id`` per logical call, so that the server
  answers a retry with the decision it already made and audits it once;
* failures as :class:`~centinela.clients.errors.ClientError` (code, message, rule ids,
  decision id, field), decoded from the status details the server sends.

Example::

    with CentinelaClient.from_data_dir(Path(".centinela"), "muni-miraflores") as client:
        info = client.server_info()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.clients.builders import new_request_id
from centinela.clients.calls import DEFAULT_TIMEOUT, CallCore, prepare
from centinela.clients.retry import RetryPolicy
from centinela.clients.tls import DEFAULT_SERVER, TlsMaterial
from centinela.v1 import audit_service_pb2 as apb
from centinela.v1 import audit_service_pb2_grpc as apb_grpc
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mpb_grpc
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rpb_grpc
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wpb_grpc

#: Largest message the client accepts (exports and pages of events can be large).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
#: HTTP/2 keepalive: a ping after this long without activity on the connection, while a
#: call is open. A portico's StreamMatch stays open all day and is idle between captures;
#: without pings, a connection that died without a word (a NAT entry expired, a link cut)
#: would hold it unanswered: idle, indefinitely; with a probe sent, until TCP gave up
#: retransmitting (~15 minutes). The server accepts pings this often
#: (``centinela.server.app.MIN_CLIENT_PING_S``).
KEEPALIVE_S = 20.0
#: How long a ping may go unanswered before the connection is declared dead (its calls
#: then fail with UNAVAILABLE, which the portico and the retry policy handle).
KEEPALIVE_TIMEOUT_S = 10.0


def _stamp_stream_request(request: mpb.StreamMatchRequest) -> mpb.StreamMatchRequest:
    """Give the face or plate request inside a stream message its client request id."""
    kind = request.WhichOneof("probe")
    if kind is None:
        return request
    inner = getattr(request, kind)
    if inner.context.client_request_id:
        return request
    copy = mpb.StreamMatchRequest()
    copy.CopyFrom(request)
    getattr(copy, kind).context.client_request_id = new_request_id()
    return copy


class CentinelaClient:
    """A synchronous client of the four Centinela services over mutual TLS.

    ``server`` is ``host:port``; ``cert``, ``key`` and ``ca`` are PEM files (or give
    ``tls`` directly). ``timeout`` is the default overall deadline of a unary call in seconds,
    retries included; ``retry`` bounds the retries of UNAVAILABLE; ``operator_id`` fills
    ``RequestContext.operator_id`` where a request leaves it empty. ``interceptors`` are
    client interceptors put in front of the channel (tests use one to see what is sent).
    ``keepalive_s`` and ``keepalive_timeout_s`` pace the HTTP/2 pings that find a dead
    connection under an open call (0 turns them off); the server refuses pings more often
    than every 10 s on an idle connection.
    A client may be shared between threads (gRPC channels are thread-safe and the client
    keeps no per-call state).

    Raises:
        ConfigError: TLS material is missing or unreadable.
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        tls: TlsMaterial | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        operator_id: str = "",
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
        keepalive_s: float = KEEPALIVE_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
    ) -> None:
        if tls is None:
            if cert is None or key is None or ca is None:
                from centinela.errors import ConfigError

                raise ConfigError(
                    "mutual TLS needs a client certificate, its key and the CA: give "
                    "--cert, --key and --ca, or --data-dir and --identity"
                )
            tls = TlsMaterial.from_files(cert, key, ca)
        self.server = server
        self.tls = tls
        policy = retry or RetryPolicy()
        # gRPC fails calls fast while the channel waits to reconnect; keep that wait in step
        # with our retry backoff, or retries would all land inside one reconnect pause.
        reconnect_ms = max(1, int(policy.initial_backoff * 1000))
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
            ("grpc.min_reconnect_backoff_ms", reconnect_ms),
            ("grpc.max_reconnect_backoff_ms", max(reconnect_ms, int(policy.max_backoff * 1000))),
        ]
        if keepalive_s > 0:
            opts += [
                ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", max(1, int(keepalive_timeout_s * 1000))),
                # Any ping's ack, not only a keepalive's: the flow-control (BDP) ping sent
                # after data would otherwise wait 60 s and hold the keepalive back.
                ("grpc.http2.ping_timeout_ms", max(1, int(keepalive_timeout_s * 1000))),
                # Keep pinging while the open call sends nothing (gRPC stops after 2, and
                # would space pings without data 5 minutes apart).
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.min_time_between_pings_ms", int(keepalive_s * 1000)),
            ]
        opts += list(options)
        channel: grpc.Channel = grpc.secure_channel(server, tls.credentials(), options=opts)
        self._raw_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self.channel = channel
        self._core = CallCore(channel, timeout=timeout, retry=policy, operator_id=operator_id)
        self._match = mpb_grpc.MatchServiceStub(channel)
        self._watchlist = wpb_grpc.WatchlistServiceStub(channel)
        self._registry = rpb_grpc.RegistryServiceStub(channel)
        self._audit = apb_grpc.AuditServiceStub(channel)

    @classmethod
    def from_data_dir(
        cls, data_dir: Path, identity: str, server: str = DEFAULT_SERVER, **kwargs: Any
    ) -> CentinelaClient:
        """A client as the development identity ``identity`` of ``<data_dir>/certs``.

        Raises:
            ConfigError: the identity's certificate files are not there.
        """
        return cls(server, tls=TlsMaterial.from_data_dir(data_dir, identity), **kwargs)

    # ---- life cycle ------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """The default overall deadline of a unary call, seconds."""
        return self._core.timeout

    @property
    def operator_id(self) -> str:
        """The operator id filled into requests that leave it empty."""
        return self._core.operator_id

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy for UNAVAILABLE."""
        return self._core.retry

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._raw_channel.close()

    def __enter__(self) -> CentinelaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- conveniences ----------------------------------------------------------------

    def server_info(self, *, timeout: float | None = None) -> mpb.GetServerInfoResponse:
        """Version, policy bundle, galleries, and the caller as the server sees it."""
        return self.get_server_info(mpb.GetServerInfoRequest(), timeout=timeout)

    def health(self, *, timeout: float | None = None) -> bool:
        """True when the server's standard health check says SERVING.

        Raises:
            ClientError: the server cannot be reached (after retries).
        """
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self._core.unary(stub.Check, health_pb2.HealthCheckRequest(), timeout=timeout)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def pages(self, method: Any, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Every page of a List RPC, following ``next_page_token``.

        ``method`` is one of this client's ``list_*`` methods; each page is one call (with
        its own client request id and retries).
        """
        current = type(request)()
        current.CopyFrom(request)
        while True:
            page = method(current, timeout=timeout)
            yield page
            if not page.next_page_token:
                return
            current.page_token = page.next_page_token
            if current.HasField("context"):
                current.context.client_request_id = ""

    # ---- streams ---------------------------------------------------------------------

    def stream_match(
        self,
        requests: Iterable[mpb.StreamMatchRequest],
        *,
        timeout: float | None = None,
    ) -> Iterator[mpb.StreamMatchResponse]:
        """StreamMatch: many probes over one stream, answered in order, one result or error each.

        Each face or plate request gets a client request id if it has none, so a caller that
        reconnects and re-sends unanswered messages unchanged is not matched twice. Not
        retried here: the caller knows what was answered (see ``centinela edge watch``).

        Raises:
            ClientError: the stream ended with an error (per-message errors arrive as
                ``StreamMatchResponse.error`` and do not end it).
        """
        return self._core.stream_stream(
            self._match.StreamMatch, requests, timeout=timeout, stamp=_stamp_stream_request
        )

    def subscribe_alerts(
        self,
        request: mpb.SubscribeAlertsRequest,
        *,
        timeout: float | None = None,
        resume: bool = True,
    ) -> Iterator[mpb.SubscribeAlertsResponse]:
        """SubscribeAlerts: a control center's live feed of alerts.

        With ``resume`` (the default), a stream cut by UNAVAILABLE is reopened from the last
        cursor received, so no alert is missed; the retry policy bounds consecutive failures.

        Raises:
            ClientError: the stream failed for good.
        """

        def after(
            req: mpb.SubscribeAlertsRequest, item: mpb.SubscribeAlertsResponse
        ) -> mpb.SubscribeAlertsRequest:
            nxt = mpb.SubscribeAlertsRequest()
            nxt.CopyFrom(req)
            nxt.cursor = item.cursor
            return nxt

        return self._core.server_stream(
            self._match.SubscribeAlerts,
            request,
            timeout=timeout,
            resume=after if resume else None,
        )

    def export_entries(
        self, request: apb.ExportEntriesRequest, *, timeout: float | None = None
    ) -> Iterator[apb.ExportEntriesResponse]:
        """ExportEntries: audit entries of a range, in index order, resumed after a cut.

        Raises:
            ClientError: the stream failed for good.
        """

        def after(
            req: apb.ExportEntriesRequest, item: apb.ExportEntriesResponse
        ) -> apb.ExportEntriesRequest:
            nxt = apb.ExportEntriesRequest()
            nxt.CopyFrom(req)
            if item.events:
                nxt.start = item.events[-1].index + 1
            return nxt

        return self._core.server_stream(
            self._audit.ExportEntries, request, timeout=timeout, resume=after
        )

    def import_templates(
        self,
        requests: Iterable[rpb.ImportTemplatesRequest],
        *,
        timeout: float | None = None,
    ) -> rpb.ImportTemplatesResponse:
        """ImportTemplates: Reniec's streamed bulk import (idempotent: re-sending is harmless).

        A list or tuple of batches is re-sent whole on UNAVAILABLE; a one-shot iterator is not
        retried. The first batch's context gets the client request id.

        Raises:
            ClientError: the import failed.
        """
        return self._core.stream_unary(self._registry.ImportTemplates, requests, timeout=timeout)

    # ---- MatchService --------------------------------------------------------

    def match_face(
        self, request: mpb.MatchFaceRequest, *, timeout: float | None = None
    ) -> mpb.MatchFaceResponse:
        """MatchFace: Match one face probe against the galleries the policy allows (PNP watchlist
        for municipalities, R2; the registry only under judicial order, R3).
        """
        return self._core.unary(self._match.MatchFace, request, timeout=timeout)

    def match_plate(
        self, request: mpb.MatchPlateRequest, *, timeout: float | None = None
    ) -> mpb.MatchPlateResponse:
        """MatchPlate: Match one plate read against the stolen-vehicle list."""
        return self._core.unary(self._match.MatchPlate, request, timeout=timeout)

    def verify_face(
        self, request: mpb.VerifyFaceRequest, *, timeout: float | None = None
    ) -> mpb.VerifyFaceResponse:
        """VerifyFace: 1:1 verification of a face against one claimed DNI in the registry (R4)."""
        return self._core.unary(self._match.VerifyFace, request, timeout=timeout)

    def confirm_alert(
        self, request: mpb.ConfirmAlertRequest, *, timeout: float | None = None
    ) -> mpb.ConfirmAlertResponse:
        """ConfirmAlert: A person confirms or rejects an alert (R9)."""
        return self._core.unary(self._match.ConfirmAlert, request, timeout=timeout)

    def get_server_info(
        self, request: mpb.GetServerInfoRequest, *, timeout: float | None = None
    ) -> mpb.GetServerInfoResponse:
        """GetServerInfo: Version, policy bundle and digest, galleries and their state."""
        return self._core.unary(self._match.GetServerInfo, request, timeout=timeout)

    def calibrate_gallery(
        self,
        requests: Iterable[mpb.CalibrateGalleryRequest],
        *,
        timeout: float | None = None,
    ) -> mpb.CalibrateGalleryResponse:
        """CalibrateGallery: a face gallery's owner measures the FPIR of its floor (R8) with
        templates of people known not to be in the gallery. Read-only; a list or tuple of
        messages is re-sent whole on UNAVAILABLE, a one-shot iterator is not retried.

        Raises:
            ClientError: the calibration failed.
        """
        return self._core.stream_unary(self._match.CalibrateGallery, requests, timeout=timeout)

    # ---- WatchlistService ----------------------------------------------------

    def create_requisition(
        self, request: wpb.CreateRequisitionRequest, *, timeout: float | None = None
    ) -> wpb.CreateRequisitionResponse:
        """CreateRequisition: Create a requisitoria, from a DNI (the face templates are taken from
        the registry gallery, so no photo is needed; the link is audited) or with supplied
        templates.
        """
        return self._core.unary(self._watchlist.CreateRequisition, request, timeout=timeout)

    def update_requisition(
        self, request: wpb.UpdateRequisitionRequest, *, timeout: float | None = None
    ) -> wpb.UpdateRequisitionResponse:
        """UpdateRequisition: Change the court, offence category or expiry of a requisitoria."""
        return self._core.unary(self._watchlist.UpdateRequisition, request, timeout=timeout)

    def lift_requisition(
        self, request: wpb.LiftRequisitionRequest, *, timeout: float | None = None
    ) -> wpb.LiftRequisitionResponse:
        """LiftRequisition: Lift a requisitoria: it stops matching at once (R6)."""
        return self._core.unary(self._watchlist.LiftRequisition, request, timeout=timeout)

    def list_requisitions(
        self, request: wpb.ListRequisitionsRequest, *, timeout: float | None = None
    ) -> wpb.ListRequisitionsResponse:
        """ListRequisitions: List requisitorias, optionally by state, newest first."""
        return self._core.unary(self._watchlist.ListRequisitions, request, timeout=timeout)

    def report_stolen_vehicle(
        self, request: wpb.ReportStolenVehicleRequest, *, timeout: float | None = None
    ) -> wpb.ReportStolenVehicleResponse:
        """ReportStolenVehicle: Report a stolen vehicle: its plate joins the stolen-vehicle list."""
        return self._core.unary(self._watchlist.ReportStolenVehicle, request, timeout=timeout)

    def recover_vehicle(
        self, request: wpb.RecoverVehicleRequest, *, timeout: float | None = None
    ) -> wpb.RecoverVehicleResponse:
        """RecoverVehicle: Mark a vehicle recovered: it stops matching at once (R6)."""
        return self._core.unary(self._watchlist.RecoverVehicle, request, timeout=timeout)

    def list_stolen_vehicles(
        self, request: wpb.ListStolenVehiclesRequest, *, timeout: float | None = None
    ) -> wpb.ListStolenVehiclesResponse:
        """ListStolenVehicles: List stolen-vehicle reports, optionally by state."""
        return self._core.unary(self._watchlist.ListStolenVehicles, request, timeout=timeout)

    def register_authorisation(
        self, request: wpb.RegisterAuthorisationRequest, *, timeout: float | None = None
    ) -> wpb.RegisterAuthorisationResponse:
        """RegisterAuthorisation: Register a judicial authorisation that allows registry 1:N
        searches within its scope (R3).
        """
        return self._core.unary(self._watchlist.RegisterAuthorisation, request, timeout=timeout)

    def revoke_authorisation(
        self, request: wpb.RevokeAuthorisationRequest, *, timeout: float | None = None
    ) -> wpb.RevokeAuthorisationResponse:
        """RevokeAuthorisation: revoke a judicial authorisation; it stops allowing searches."""
        return self._core.unary(self._watchlist.RevokeAuthorisation, request, timeout=timeout)

    def list_authorisations(
        self, request: wpb.ListAuthorisationsRequest, *, timeout: float | None = None
    ) -> wpb.ListAuthorisationsResponse:
        """ListAuthorisations: List judicial authorisations."""
        return self._core.unary(self._watchlist.ListAuthorisations, request, timeout=timeout)

    def register_site(
        self, request: wpb.RegisterSiteRequest, *, timeout: float | None = None
    ) -> wpb.RegisterSiteResponse:
        """RegisterSite: Register a camera or portico to a municipality (R5)."""
        return self._core.unary(self._watchlist.RegisterSite, request, timeout=timeout)

    def deactivate_site(
        self, request: wpb.DeactivateSiteRequest, *, timeout: float | None = None
    ) -> wpb.DeactivateSiteResponse:
        """DeactivateSite: Deactivate a site: probes from it are refused."""
        return self._core.unary(self._watchlist.DeactivateSite, request, timeout=timeout)

    def list_sites(
        self, request: wpb.ListSitesRequest, *, timeout: float | None = None
    ) -> wpb.ListSitesResponse:
        """ListSites: List sites, optionally of one municipality."""
        return self._core.unary(self._watchlist.ListSites, request, timeout=timeout)

    def list_sightings(
        self, request: wpb.ListSightingsRequest, *, timeout: float | None = None
    ) -> wpb.ListSightingsResponse:
        """ListSightings: Sighting history (rastreo) of an active requisitoria or stolen vehicle:
        its hits, newest first.
        """
        return self._core.unary(self._watchlist.ListSightings, request, timeout=timeout)

    # ---- RegistryService -----------------------------------------------------

    def remove_subject(
        self, request: rpb.RemoveSubjectRequest, *, timeout: float | None = None
    ) -> rpb.RemoveSubjectResponse:
        """RemoveSubject: Remove every template of one DNI from the registry gallery."""
        return self._core.unary(self._registry.RemoveSubject, request, timeout=timeout)

    def record_objection(
        self, request: rpb.RecordObjectionRequest, *, timeout: float | None = None
    ) -> rpb.RecordObjectionResponse:
        """RecordObjection: Record that a person objects to the use of their face (R7)."""
        return self._core.unary(self._registry.RecordObjection, request, timeout=timeout)

    def withdraw_objection(
        self, request: rpb.WithdrawObjectionRequest, *, timeout: float | None = None
    ) -> rpb.WithdrawObjectionResponse:
        """WithdrawObjection: Withdraw an objection."""
        return self._core.unary(self._registry.WithdrawObjection, request, timeout=timeout)

    def get_import_status(
        self, request: rpb.GetImportStatusRequest, *, timeout: float | None = None
    ) -> rpb.GetImportStatusResponse:
        """GetImportStatus: How far the search index is behind the durable store."""
        return self._core.unary(self._registry.GetImportStatus, request, timeout=timeout)

    # ---- AuditService --------------------------------------------------------

    def get_checkpoint(
        self, request: apb.GetCheckpointRequest, *, timeout: float | None = None
    ) -> apb.GetCheckpointResponse:
        """GetCheckpoint: The latest signed checkpoint."""
        return self._core.unary(self._audit.GetCheckpoint, request, timeout=timeout)

    def list_events(
        self, request: apb.ListEventsRequest, *, timeout: float | None = None
    ) -> apb.ListEventsResponse:
        """ListEvents: Events matching filters, oldest first, paged."""
        return self._core.unary(self._audit.ListEvents, request, timeout=timeout)

    def get_inclusion_proof(
        self, request: apb.GetInclusionProofRequest, *, timeout: float | None = None
    ) -> apb.GetInclusionProofResponse:
        """GetInclusionProof: Inclusion proof of one entry in a tree of a given size (RFC 9162
        §2.1.3).
        """
        return self._core.unary(self._audit.GetInclusionProof, request, timeout=timeout)

    def get_consistency_proof(
        self, request: apb.GetConsistencyProofRequest, *, timeout: float | None = None
    ) -> apb.GetConsistencyProofResponse:
        """GetConsistencyProof: Consistency proof between two tree sizes (RFC 9162 §2.1.4)."""
        return self._core.unary(self._audit.GetConsistencyProof, request, timeout=timeout)

    def get_stats(
        self, request: apb.GetStatsRequest, *, timeout: float | None = None
    ) -> apb.GetStatsResponse:
        """GetStats: Counts by municipality, site, purpose, outcome; denials by rule; alert
        confirmations; shadow-policy disagreements by rule.
        """
        return self._core.unary(self._audit.GetStats, request, timeout=timeout)

    def create_evidence(
        self, request: apb.CreateEvidenceRequest, *, timeout: float | None = None
    ) -> apb.CreateEvidenceResponse:
        """CreateEvidence: The evidence package of one decision: its entry, inclusion proof,
        checkpoint and key.
        """
        return self._core.unary(self._audit.CreateEvidence, request, timeout=timeout)


__all__ = ["CentinelaClient", "prepare"]

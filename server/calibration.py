"""CalibrateGallery: a face gallery's owner measures the FPIR its floor gives (R8).

R8 asks for each face gallery's threshold to be "calibrated for a target FPIR". What a floor
yields depends on the model, on the probes and on the gallery's size (each stranger gets one
chance per enrolled template to look like someone), so it can only be measured against the
live gallery, with the owner's own set of people known not to be in it. This RPC does that:

* the first message names the gallery and the target; every message may carry templates,
  each validated like a probe (model, dimension, finite values, unit norm);
* the policy decides once, on the first message: only a role that lists the gallery may
  calibrate it (PNP administrators the watchlist, Reniec the registry, R15), and not while
  facial matching is switched off (R12);
* each template is searched for its best active entry, as alert mode searches (R6), in the
  executor, never on the event loop; the templates are dropped as soon as they are searched
  (R11), and only their best scores are kept, in memory, for the length of the call;
* nothing is searched before the bundle's ``calibration.min_templates`` (1,000 packaged)
  have arrived: a calibration is a statistic of a set, never a search of a few faces;
* the answer and the call's one audit entry carry aggregates only (the threshold, the FPIR
  at the floor with its interval, the curve, counts) and a keyed digest of the set: no score
  of any one template and no candidate. (What a set crafted around one face can still
  reveal to its owner is in the README, "Calibrating a face gallery's floor".)

The arithmetic is :mod:`centinela.matcher.calibration`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt

from centinela.audit.entry import EventType
from centinela.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelMismatch,
    ResourceExhausted,
)
from centinela.logs import get_logger
from centinela.matcher.calibration import Calibration, calibrate, expected_fpir, outgrown
from centinela.server.components import Components
from centinela.server.context import current_call, current_caller
from centinela.server.pipeline import decision_info, reference_ref
from centinela.server.validation import GALLERIES, GALLERY_ENUM, check_context, check_vector
from centinela.v1 import common_pb2
from centinela.v1 import match_service_pb2 as pb

log = get_logger("server.calibration")

#: The galleries a calibration can measure (plate lists are matched by edit distance).
FACE_GALLERIES = ("pnp_watchlist", "reniec_registry")
#: Most templates in one call: their best scores are held in memory (8 bytes each).
MAX_TEMPLATES = 1_000_000
#: Fewest templates in one call unless the bundle's ``calibration.min_templates`` says
#: otherwise: a calibration is a statistic of a set, never a search of a few faces.
MIN_TEMPLATES = 1000
#: The largest minimum a bundle may ask for: that many templates wait, validated, in memory
#: (2 KiB each at 512 dimensions) before the first search.
MAX_WAITING = 100_000


def _bundle_int(
    raw: Any, default: int, *, least: int | None = None, most: int | None = None
) -> int:
    """A whole number from the bundle's data, or ``default`` where it is not one (a JSON
    ``true`` is not a number here) or lies outside ``least``..``most``."""
    if not isinstance(raw, int) or isinstance(raw, bool):
        return default
    if (least is not None and raw < least) or (most is not None and raw > most):
        return default
    return raw


class Calibrator:
    """Runs CalibrateGallery calls against the server's matcher."""

    def __init__(self, components: Components) -> None:
        self.c = components
        #: Held for a calibration's searches: a bulk job, one at a time beside live matching.
        self._running = asyncio.Lock()

    def _templates(
        self, message: pb.CalibrateGalleryRequest, first_index: int
    ) -> npt.NDArray[np.float32]:
        """The message's templates as a matrix, each checked like a probe.

        Raises:
            ModelMismatch: a template of another model (R13). InvalidArgument: a malformed one.
        """
        model, dim = self.c.face_model_id, int(self.c.matcher.specs["pnp_watchlist"].dim)
        rows = []
        for i, t in enumerate(message.templates):
            field = f"templates[{first_index + i}]"
            if not t.model_id:
                raise InvalidArgument("is required", field=f"{field}.model_id")
            if t.model_id != model:
                raise ModelMismatch(
                    "comes from another embedding model than the gallery's (R13)",
                    field=f"{field}.model_id",
                )
            rows.append(check_vector(t.vector, dimension=dim, field=f"{field}.vector"))
        return np.stack(rows) if rows else np.empty((0, dim), dtype=np.float32)

    def _best_scores(
        self, gallery: str, templates: npt.NDArray[np.float32], now: dt.datetime
    ) -> list[float]:
        """Each template's best score among the gallery's active entries (-1.0 if none)."""
        g = self.c.matcher.gallery(gallery)
        g.check_model(self.c.face_model_id)
        scores: list[float] = g.best_scores(templates, now=now).tolist()
        return scores

    def _min_templates(self) -> int:
        """The bundle's ``calibration.min_templates``: 1 to MAX_WAITING (they wait in memory
        until the search starts); MIN_TEMPLATES when absent or out of range."""
        raw = self.c.policy_config().get("calibration", {}).get("min_templates", MIN_TEMPLATES)
        return _bundle_int(raw, MIN_TEMPLATES, least=1, most=MAX_WAITING)

    def _request(self, first: pb.CalibrateGalleryRequest) -> tuple[str, dict[str, Any], float]:
        """The gallery, its bundle entry and the target, from the first message.

        Raises:
            InvalidArgument: not a face gallery, or a target outside (0, 1).
        """
        gallery = GALLERIES.get(first.gallery, "")
        if gallery not in FACE_GALLERIES:
            raise InvalidArgument("must be PNP_WATCHLIST or RENIEC_REGISTRY", field="gallery")
        spec = dict(self.c.policy_config().get("galleries", {}).get(gallery, {}))
        target = float(first.target_fpir) or float(spec.get("target_fpir", 0.0))
        if not (math.isfinite(target) and 0.0 < target < 1.0):
            raise InvalidArgument(
                "must lie in (0, 1); 0 takes the bundle's target_fpir", field="target_fpir"
            )
        return gallery, spec, target

    async def _search_all(
        self,
        gallery: str,
        batch: npt.NDArray[np.float32],
        rest: AsyncIterator[pb.CalibrateGalleryRequest],
        now: dt.datetime,
        least: int,
    ) -> tuple[list[float], bytes]:
        """Every template's best score, and the SHA-256 of the set.

        Nothing is searched before ``least`` templates have arrived (they wait, validated, in
        memory), so a set too small to be a statistic is refused without a search. From
        then on each message is searched in the executor before the next is read (flow
        control), and its templates are dropped as soon as they are searched (R11).

        Raises:
            InvalidArgument, ModelMismatch: a malformed template; fewer than ``least`` or more
                than MAX_TEMPLATES templates.
        """
        loop = asyncio.get_running_loop()
        scores: list[float] = []
        digest = hashlib.sha256()
        waiting, received = [batch], len(batch)
        del batch
        while True:
            if received >= least:
                for part in waiting:
                    digest.update(part.tobytes())
                    scores += await loop.run_in_executor(
                        self.c.executor, self._best_scores, gallery, part, now
                    )
                waiting.clear()
            try:
                message = await rest.__anext__()
            except StopAsyncIteration:
                break
            if received + len(message.templates) > MAX_TEMPLATES:
                raise InvalidArgument(
                    f"at most {MAX_TEMPLATES:,} templates in one calibration", field="templates"
                )
            waiting.append(self._templates(message, received))
            received += len(message.templates)
        if received < least:
            raise InvalidArgument(
                f"carried {received:,}; a calibration needs at least {least:,} "
                "(a statistic of a set, not a search of a few faces)",
                field="templates",
            )
        return scores, digest.digest()

    async def run(
        self, requests: AsyncIterator[pb.CalibrateGalleryRequest]
    ) -> pb.CalibrateGalleryResponse:
        """Decide on the first message, search every template, audit, answer.

        Raises:
            InvalidArgument: empty stream, bad gallery or target, malformed template, too few
                or too many.
            ModelMismatch: a template of another model. FailedPrecondition: empty gallery.
            ResourceExhausted: another calibration is running.
            PolicyDenied, FacialMatchingDisabled: denied (R8, R12, R15).
            AuditUnavailable: the entry could not be made durable (no answer is given).
        """
        caller, call = current_caller(), current_call()
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument(
                "the calibration stream carried no message", field="gallery"
            ) from None
        ctx = check_context(first.context, purpose_required=False)
        gallery, spec, target = self._request(first)
        batch = self._templates(first, 0)
        refs = {"gallery": gallery, **reference_ref(ctx.get("reference", ""))}
        decision, decision_id = await self.c.pipeline.authorise(
            "CalibrateGallery",
            call=call,
            caller=caller,
            context=ctx,
            refs=refs,
            galleries=[gallery],
            mode="ADMIN",
            probe={"kind": "face", "model_id": self.c.face_model_id},
            rate=self.c.pipeline.rates.observe(caller.name, ""),
        )
        now = dt.datetime.now(dt.UTC)
        if self.c.matcher.gallery(gallery).searchable(now) == 0:
            raise FailedPrecondition("the gallery has no active entry to calibrate against")
        if self._running.locked():
            raise ResourceExhausted(
                "another calibration is running; one runs at a time, so that live matching "
                "keeps its share of the executor. Retry when it has finished"
            )
        async with self._running:
            least = self._min_templates()
            scores, digest = await self._search_all(gallery, batch, iterator, now, least)
        floor = float(spec.get("threshold_floor", 0.0))
        result = calibrate(np.asarray(scores), target=target, floor=floor)
        size = self.c.matcher.gallery(gallery).searchable(now)
        event = self.c.pipeline.event(
            EventType.CALIBRATION,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="CALIBRATED" if result.resolved else "UNRESOLVED",
            refs=refs,
            digests={"probe": self.c.digester.digest("probe", digest)},
            metrics={
                "templates": result.templates,
                "gallery_size": size,
                "target_fpir": target,
                "threshold": round(result.threshold, 6),
                "threshold_floor": floor,
                "fpir_at_floor": round(result.fpir_at_floor, 6),
            },
        )
        log.info(
            "calibration.done",
            gallery=gallery,
            templates=result.templates,
            gallery_size=size,
            resolved=result.resolved,
        )

        def respond(index: int) -> pb.CalibrateGalleryResponse:
            return _response(
                result,
                gallery,
                size,
                decision_info(decision, decision_id, index, self.c.bundle_name),
            )

        answer: pb.CalibrateGalleryResponse = await self.c.pipeline.commit(event, respond)
        return answer


def _response(
    result: Calibration, gallery: str, size: int, info: common_pb2.DecisionInfo
) -> pb.CalibrateGalleryResponse:
    low, high = result.fpir_at_floor_interval
    return pb.CalibrateGalleryResponse(
        decision=info,
        gallery=GALLERY_ENUM[gallery],
        gallery_size=size,
        templates=result.templates,
        target_fpir=result.target_fpir,
        threshold=result.threshold,
        resolved=result.resolved,
        threshold_floor=result.floor,
        fpir_at_floor=result.fpir_at_floor,
        fpir_at_floor_low=low,
        fpir_at_floor_high=high,
        curve=[pb.FpirPoint(threshold=t, fpir=f) for t, f in result.curve],
    )


# ---- a gallery that outgrows its calibration -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationState:
    """How a face gallery's size compares with the size its floor was calibrated for."""

    gallery: str
    active: int  # entries a search may return now
    calibrated_size: int  # 0: the bundle does not say
    target_fpir: float
    expected_fpir: float  # 0.0 when calibrated_size is 0

    @property
    def outgrown(self) -> bool:
        return outgrown(self.active, self.calibrated_size)


def calibration_state(components: Components, gallery: str) -> CalibrationState:
    """The state of ``gallery`` under the active bundle."""
    spec = components.policy_config().get("galleries", {}).get(gallery, {})
    active = components.matcher.gallery(gallery).searchable(dt.datetime.now(dt.UTC))
    raw = spec.get("calibrated_size", 0)
    calibrated = _bundle_int(raw, 0)
    target = float(spec.get("target_fpir", 0.0) or 0.0)
    return CalibrationState(
        gallery, active, calibrated, target, expected_fpir(target, active, calibrated)
    )


class CalibrationWatch:
    """Logs once when a face gallery outgrows its calibration (and once when it no longer
    does), and once per bundle when a floor declares no calibrated size."""

    def __init__(self, components: Components) -> None:
        self.c = components
        self._outgrown: set[str] = set()
        self._unknown: set[tuple[str, str]] = set()

    def check(self) -> list[CalibrationState]:
        states = [calibration_state(self.c, g) for g in FACE_GALLERIES]
        for s in states:
            if s.calibrated_size == 0:
                key = (s.gallery, self.c.policy.bundle_digest)
                if key not in self._unknown:
                    self._unknown.add(key)
                    log.info(
                        "gallery.calibration_size_unknown",
                        gallery=s.gallery,
                        active=s.active,
                        hint="set calibrated_size with the floor (CalibrateGallery reports it)",
                    )
            if s.outgrown and s.gallery not in self._outgrown:
                self._outgrown.add(s.gallery)
                log.warning(
                    "gallery.outgrew_calibration",
                    gallery=s.gallery,
                    active=s.active,
                    calibrated_size=s.calibrated_size,
                    target_fpir=s.target_fpir,
                    expected_fpir=round(s.expected_fpir, 6),
                    hint="recalibrate the floor (CalibrateGallery) and update the bundle",
                )
            elif not s.outgrown and s.gallery in self._outgrown:
                self._outgrown.discard(s.gallery)
                log.info("gallery.calibration_fits_again", gallery=s.gallery, active=s.active)
        return states


async def watch_calibration(components: Components, every_s: float = 60.0) -> None:
    """Run :class:`CalibrationWatch` forever (cheap: sizes and a dict look-up, on the loop)."""
    watch = CalibrationWatch(components)
    checked = False
    while True:
        try:
            watch.check()
            checked = True
        except Exception as exc:  # not started yet, or a bundle being swapped: next round
            log.debug("gallery.calibration_check_skipped", error=type(exc).__name__)
        # Every second until the galleries are up, so a start-up warning is not a minute late.
        await asyncio.sleep(every_s if checked else 1.0)

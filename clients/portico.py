"""Portico mode: frames dropped into a directory become probes on one StreamMatch stream.

Invariants:

* Frames are read and encoded here; only embeddings leave the process (R11 holds at the
  edge: an image is never sent, and frames are not copied anywhere).
* Every probe is sent once per connection and answered once: probes sent but unanswered
  when a connection breaks are re-sent, unchanged (same sequence number, same client request
  id), on the next one, so the server's idempotency makes a re-send return the decision it
  already made instead of deciding twice.
* The counters add up: ``faces = held_back + probes + drops``; every probe ends ``answered``
  (with a result or an error) or is still ``pending`` when the agent stops.
* Losing the server is not fatal: UNAVAILABLE reconnects with bounded exponential backoff
  (reset after each success). Any other stream-level error (certificate refused, RPC missing,
  permission) stops the agent with that error.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from centinela.clients import builders
from centinela.clients.client import CentinelaClient
from centinela.clients.encoder import IMAGE_SUFFIXES, FaceEncoder, load_image
from centinela.clients.errors import ClientError, from_error_status
from centinela.clients.retry import RetryPolicy
from centinela.errors import InvalidArgument
from centinela.v1 import match_service_pb2 as mpb


@dataclasses.dataclass
class PorticoCounts:
    """What the agent did so far."""

    frames: int = 0
    unreadable: int = 0
    faces: int = 0
    held_back: int = 0
    probes: int = 0
    answered: int = 0
    alerts: int = 0
    errors: int = 0
    drops: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PorticoEvent:
    """Something worth telling the operator: an answer, an alert, a drop, a reconnection."""

    kind: str  # "frame", "answer", "alert", "error", "drop", "disconnect", "connect"
    frame: str = ""
    face: int = 0
    response: mpb.StreamMatchResponse | None = None
    error: ClientError | None = None
    detail: str = ""


Listener = Callable[[PorticoEvent], None]


class Portico:
    """Watch ``directory`` and match every face of every new frame over one stream.

    ``listener`` receives every :class:`PorticoEvent` (the command prints them); it is called
    from the scanning thread and from the stream's thread, so it must be quick and
    thread-safe (printing is). ``reconnect`` paces reconnections after UNAVAILABLE.
    """

    def __init__(
        self,
        client: CentinelaClient,
        encoder: FaceEncoder,
        directory: Path,
        *,
        site_id: str,
        purpose: str | int = "WANTED_PERSON",
        listener: Listener | None = None,
        poll_interval: float = 0.25,
        settle: float = 0.2,
        max_queue: int = 256,
        reconnect: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.encoder = encoder
        self.directory = directory
        self.site_id = site_id
        self.purpose = builders.purpose_value(purpose)
        self.listener = listener or (lambda event: None)
        self.poll_interval = poll_interval
        self.settle = settle
        self.reconnect = reconnect or RetryPolicy(
            max_attempts=1_000_000, initial_backoff=0.2, max_backoff=5.0
        )
        self.counts = PorticoCounts()
        self._queue: queue.Queue[mpb.StreamMatchRequest] = queue.Queue(max_queue)
        self._pending: collections.OrderedDict[int, tuple[str, int, mpb.StreamMatchRequest]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._sequence = 0
        self._stop = threading.Event()
        self._fatal: ClientError | None = None
        self._labels: dict[int, tuple[str, int]] = {}

    # ---- control ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the agent to stop (from any thread); answers in flight are awaited briefly."""
        self._stop.set()

    @property
    def pending(self) -> int:
        """Probes sent or queued and not answered yet."""
        with self._lock:
            return len(self._pending) + self._queue.qsize()

    def run(self, *, once: bool = False, drain_timeout: float = 30.0) -> ClientError | None:
        """Run until :meth:`stop` (or, with ``once``, until the frames present at start are
        answered). Returns the fatal stream error, if one stopped the agent."""
        sender = threading.Thread(target=self._stream_loop, name="portico-stream", daemon=True)
        sender.start()
        try:
            while not self._stop.is_set() and self._fatal is None:
                found = self.scan_once()
                if once:
                    break
                if not found:
                    self._stop.wait(self.poll_interval)
        finally:
            deadline = time.monotonic() + drain_timeout
            while self.pending and time.monotonic() < deadline and self._fatal is None:
                if self._stop.is_set() and not once:
                    break
                time.sleep(0.05)
            self._stop.set()
            sender.join(timeout=10)
        return self._fatal

    # ---- frames ----------------------------------------------------------------------

    def _new_frames(self) -> list[Path]:
        now = time.time()
        frames: list[tuple[float, str, Path]] = []
        for path in self.directory.iterdir():
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name in self._seen:
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime < self.settle:
                continue  # still being written
            frames.append((mtime, path.name, path))
        return [p for _m, _n, p in sorted(frames)]

    def scan_once(self) -> int:
        """Encode the frames that appeared since the last scan and queue their probes."""
        frames = self._new_frames()
        for path in frames:
            if self._stop.is_set() or self._fatal is not None:
                break
            self._seen.add(path.name)
            self.process_frame(path)
        return len(frames)

    def process_frame(self, path: Path) -> None:
        """Encode one frame and queue a probe for each face that passes the gate."""
        captured = dt.datetime.now(dt.UTC)
        try:
            result = self.encoder.analyse(load_image(path))
        except InvalidArgument as exc:
            self.counts.unreadable += 1
            self.listener(PorticoEvent("drop", frame=path.name, detail=exc.diagnostics()))
            return
        self.counts.frames += 1
        self.counts.faces += result.detected
        self.counts.held_back += len(result.rejected)
        self.listener(
            PorticoEvent(
                "frame",
                frame=path.name,
                detail=f"{result.detected} face(s), {len(result.faces)} sent, "
                f"{len(result.rejected)} held back",
            )
        )
        for i, face in enumerate(result.faces, start=1):
            request = builders.match_face_request(
                builders.face_probe(face.vector, face.model_id, face.quality),
                site_id=self.site_id,
                purpose=self.purpose,
                capture_time=captured,
                operator_id=self.client.operator_id,
            )
            # The id is fixed now, so a re-send after a reconnection is the same request.
            request.context.client_request_id = builders.new_request_id()
            with self._lock:
                self._sequence += 1
                seq = self._sequence
                self._labels[seq] = (path.name, i)
            message = mpb.StreamMatchRequest(sequence=seq, face=request)
            try:
                self._queue.put_nowait(message)
                self.counts.probes += 1
            except queue.Full:
                self.counts.drops += 1
                self.listener(PorticoEvent("drop", frame=path.name, face=i, detail="queue full"))

    # ---- the stream ------------------------------------------------------------------

    def _outgoing(self, broken: threading.Event) -> Iterator[mpb.StreamMatchRequest]:
        with self._lock:
            resend = [msg for _f, _i, msg in self._pending.values()]
        yield from resend
        while not broken.is_set():
            if self._stop.is_set():
                return
            try:
                msg = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._lock:
                frame, face = self._labels.get(msg.sequence, ("", 0))
                self._pending[msg.sequence] = (frame, face, msg)
            yield msg

    def _stream_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            broken = threading.Event()
            err: ClientError | None = None
            try:
                for response in self.client.stream_match(self._outgoing(broken)):
                    if failures:
                        self.counts.reconnects += 1
                        self.listener(
                            PorticoEvent("connect", detail=f"after {failures} failed attempt(s)")
                        )
                        failures = 0
                    self._answer(response)
            except ClientError as exc:
                err = exc
            finally:
                broken.set()
            if self._stop.is_set():
                return
            if err is not None and err.code not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            ):
                self._fatal = err
                self.listener(PorticoEvent("error", error=err, detail="stream ended"))
                self._stop.set()
                return
            # UNAVAILABLE, or the server closed the stream (e.g. it is shutting down).
            failures += 1
            if failures == 1 or failures % 10 == 0:
                self.listener(
                    PorticoEvent(
                        "disconnect",
                        error=err,
                        detail=f"reconnecting with backoff, attempt {failures} "
                        f"({self.pending} probes waiting)",
                    )
                )
            self._stop.wait(self.reconnect.backoff(min(failures, 30)))

    def _answer(self, response: mpb.StreamMatchResponse) -> None:
        with self._lock:
            entry = self._pending.pop(response.sequence, None)
            self._labels.pop(response.sequence, None)
        if entry is None:
            return  # an answer to a re-send that was already answered
        frame, face, _msg = entry
        self.counts.answered += 1
        which = response.WhichOneof("result")
        if which == "error":
            self.counts.errors += 1
            err = from_error_status(response.error)
            self.listener(PorticoEvent("error", frame=frame, face=face, error=err))
            return
        alert = response.face.alert if which == "face" else response.plate.alert
        if alert:
            self.counts.alerts += 1
        kind = "alert" if alert else "answer"
        self.listener(PorticoEvent(kind, frame=frame, face=face, response=response))

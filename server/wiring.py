"""Assemble the application's components from settings (the composition root).

Start-up order: data directory → database and migrations → key provider → audit log (its
signing and HMAC keys) → policy engines (with dynamic data from the records) → matcher (from
snapshot or store) → servicers. A ``SERVICE_START`` entry with the digests of the policy
bundle and of the configuration is durable before the first call is served; shutdown writes
``SERVICE_STOP`` and closes in reverse order, the audit log last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.engine import Engine

from centinela.audit.entry import AuditEvent, Digester, EventType, artifact_digest
from centinela.audit.keys import load_or_create_hmac_key, load_or_create_signing_key
from centinela.audit.log import AuditLog
from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.logs import get_logger
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.service import Matcher, default_galleries
from centinela.matcher.store import TemplateStore
from centinela.policy import Bundle, EmbeddedEngine, OpaServerEngine, PolicyEngine, PolicyService
from centinela.server.alerts import AlertStore
from centinela.server.app import Servicers
from centinela.server.calibration import watch_calibration
from centinela.server.components import Components, WatchlistView
from centinela.server.idempotency import IdempotencyStore
from centinela.server.instance import InstanceLock
from centinela.server.match_service import MatchServicer
from centinela.server.pipeline import Pipeline, artifact
from centinela.server.records import Records
from centinela.server.watchlist_service import WatchlistServicer
from centinela.storage import make_engine

log = get_logger("server.wiring")


@dataclasses.dataclass
class Application:
    """The running components and the servicers built on them."""

    settings: Settings
    engine: Engine
    servicers: Servicers
    components: Components

    def unready(self) -> str | None:
        """Why the service cannot answer a match now, or None: the audit log refuses
        appends, or its last append failed and the database still cannot serve it (blocking:
        it may read the database)."""
        return self.components.audit.probe()

    def reload(self) -> None:
        """SIGHUP: reload the policy bundles from disk (refused if they fail their tests)."""
        results = self.components.policy.reload()
        changed = any(r.changed for r in results)  # taken, and another digest
        if changed:
            self.components.pipeline.cache.clear()
        for r in results:
            log.info(
                "policy.reload", role=r.role, ok=r.ok, digest=r.digest_after, message=r.message
            )
        if changed:
            event = AuditEvent(
                event_type=EventType.POLICY_RELOAD,
                outcome="RELOADED",
                policy_bundle_digest=artifact(self.components.policy.bundle_digest),
            )
            self.components.audit.append_blocking(event)

    async def close(self) -> None:
        """Write SERVICE_STOP, then close components in reverse order of creation."""
        c = self.components
        c.stopping.set()
        for name in ("purge_task", "calibration_task", "instance_task"):
            task = c.extra.get(name)
            if task is not None:
                task.cancel()
        if c.feed is not None:
            c.feed.stop()
        try:
            await c.audit.append(
                AuditEvent(
                    event_type=EventType.SERVICE_STOP,
                    outcome="STOPPED",
                    policy_bundle_digest=artifact(c.policy.bundle_digest),
                )
            )
        except Exception as exc:  # the log may be the thing that failed
            log.error("service_stop_not_audited", error=type(exc).__name__)
        await asyncio.to_thread(c.matcher.stop)
        c.policy.stop_watching()
        c.executor.shutdown(wait=True)
        from centinela.server.audit_service import AuditServicer

        if isinstance(self.servicers.audit, AuditServicer):
            # Counts SERVICE_STOP and saves the statistics, while the log is still open.
            await asyncio.to_thread(self.servicers.audit.finish_stats)
        await asyncio.to_thread(c.audit.close)
        c.idempotency.close()
        _close_engine(c.policy.active)
        _close_engine(c.policy.shadow)
        if c.instance is not None:
            c.instance.close()
        self.engine.dispose()


def _engine_for(settings: Settings, bundle: Bundle) -> PolicyEngine:
    if settings.policy_engine == "embedded":
        return EmbeddedEngine(bundle)
    if settings.policy_engine == "opa":
        engine = OpaServerEngine(settings.opa_url, bundle)
        engine.publish()
        return engine
    raise ConfigError(f"policy_engine must be 'embedded' or 'opa', not {settings.policy_engine!r}")


def build_components(settings: Settings) -> Components:
    """Create every component (blocking; run it in a thread from async code).

    If any step fails, what the earlier steps opened is closed again, in reverse order (the
    audit writer, the matcher's catch-up thread, the executor, the database pool), so a
    failed start leaves no threads or connections behind.
    """
    with contextlib.ExitStack() as undo:
        components = _build_components(settings, undo)
        undo.pop_all()
    return components


def _build_components(settings: Settings, undo: contextlib.ExitStack) -> Components:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.effective_database_url)
    undo.callback(engine.dispose)
    # Before anything reads or writes: a second server on this database stops here.
    instance = InstanceLock.acquire(engine)
    undo.callback(instance.close)
    keys_dir = settings.effective_keys_dir
    records = Records(engine)
    alerts = AlertStore(engine)
    idem = IdempotencyStore(engine)
    undo.callback(idem.close)

    audit = AuditLog.open(
        engine,
        load_or_create_signing_key(keys_dir / "audit-log.ed25519"),
        settings.audit_origin,
        checkpoint_every_entries=settings.checkpoint_every_entries,
        checkpoint_every_seconds=settings.checkpoint_every_seconds,
        # After a database outage, no append until this server holds its lock again.
        resume_guard=instance.check if instance.needs_watch else None,
    )
    undo.callback(audit.close)
    digester = Digester(load_or_create_hmac_key(keys_dir / "audit-hmac.key"))

    active_bundle = Bundle.load(settings.policy_bundle)
    active = _engine_for(settings, active_bundle)
    undo.callback(_close_engine, active)
    shadow = None
    if settings.shadow_bundle:
        # In process whatever the active engine: an OPA server holds one bundle (both
        # declare `package centinela`), and the shadow's would replace the active one's.
        shadow = EmbeddedEngine(Bundle.load(settings.shadow_bundle))
        undo.callback(_close_engine, shadow)
    policy = PolicyService(active, shadow)
    face_model_id = settings.effective_face_model_id
    models = {"pnp_watchlist": face_model_id, "reniec_registry": face_model_id}
    policy.set_dynamic_data(records.policy_data() | {"models": models})

    store = TemplateStore(engine, FileKeyProvider(keys_dir))
    snapshot_dir = settings.effective_snapshot_dir
    snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    matcher = Matcher(store, galleries=default_galleries(face_model_id), snapshot_dir=snapshot_dir)
    undo.callback(matcher.stop)
    matcher.start(
        lambda p: (
            log.info("matcher.start", phase=p.phase, gallery=p.gallery, done=p.done, total=p.total)
            if p.total >= 10_000 or p.phase == "ready"
            else None
        )
    )
    matcher.run_in_background()

    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="centinela")
    undo.callback(executor.shutdown, wait=False)
    pipeline = Pipeline(policy, audit, digester, bundle_name=active_bundle.name, executor=executor)
    view = WatchlistView(records)
    view.refresh()
    components = Components(
        settings=settings,
        engine=engine,
        records=records,
        alerts=alerts,
        idempotency=idem,
        audit=audit,
        digester=digester,
        policy=policy,
        matcher=matcher,
        pipeline=pipeline,
        view=view,
        executor=executor,
        face_model_id=face_model_id,
        bundle_name=active_bundle.name,
        shadow_name=settings.shadow_bundle,
        instance=instance,
    )
    config_doc = json.dumps(
        {k: str(v) for k, v in dataclasses.asdict(settings).items()}, sort_keys=True
    ).encode()
    audit.append_blocking(
        AuditEvent(
            event_type=EventType.SERVICE_START,
            outcome="STARTED",
            policy_bundle_digest=artifact(policy.bundle_digest),
            artifacts={"config": artifact_digest(config_doc)},
        )
    )
    return components


def _close_engine(engine: PolicyEngine | None) -> None:
    """Release what a policy engine holds (the OPA client's HTTP session), if anything."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def build_servicers(components: Components) -> Servicers:
    """The four services over the components."""
    from centinela.server.audit_service import AuditServicer
    from centinela.server.registry_service import RegistryServicer

    return Servicers(
        match=MatchServicer(components),
        watchlist=WatchlistServicer(components),
        registry=RegistryServicer(components),
        audit=AuditServicer(components),
    )


async def purge_expired(components: Components, every_s: float = 60.0) -> None:
    """Enforce retention, forever: sightings past their list's period (policy data) and
    idempotency records past theirs."""
    while True:
        try:
            now = dt.datetime.now(dt.UTC)
            removed = await asyncio.to_thread(
                components.alerts.purge, components.sighting_retention_days(), now
            )
            pruned = await asyncio.to_thread(components.idempotency.prune, now)
            if removed or pruned:
                log.info("retention.purged", alerts=removed, idempotency_records=pruned)
        except Exception as exc:  # keep trying: the next round may succeed
            log.warning("retention.purge_failed", error=type(exc).__name__)
        await asyncio.sleep(every_s)


async def watch_instance_lock(lock: InstanceLock, every_s: float = 5.0) -> None:
    """Keep the database's server lock, forever: a PostgreSQL session lock ends when the
    database restarts, and is taken again here once it is back."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(lock.check)


async def build_application(settings: Settings) -> Application:
    """Create the data directory and every component; nothing is served yet."""
    components = await asyncio.to_thread(build_components, settings)
    components.extra["purge_task"] = asyncio.create_task(purge_expired(components))
    components.extra["calibration_task"] = asyncio.create_task(watch_calibration(components))
    if components.instance is not None and components.instance.needs_watch:
        components.extra["instance_task"] = asyncio.create_task(
            watch_instance_lock(components.instance)
        )
    return Application(
        settings=settings,
        engine=components.engine,
        servicers=build_servicers(components),
        components=components,
    )

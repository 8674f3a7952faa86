"""A Centinela server for benchmarks: the real service plus a bare echo RPC, in a subprocess.

    python benchmarks/_bench_server.py --data-dir DIR --templates N [--port-file F]

Populates the watchlist with ``N`` synthetic templates (the realistic generator of
``centinela.matcher.synth``) the first time, then serves the real MatchService over mutual
TLS and, on the same server and port, ``/bench.Echo/Echo``, which returns its request bytes
unchanged: the ceiling of a Python gRPC server on this machine (TLS, HTTP/2, the
interceptor, no work). Writes the bound port to ``--port-file`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from centinela import logs
from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.store import TemplateRecord
from centinela.policy.bundle import packaged_root
from centinela.server.app import CentinelaServer, freeze_startup_heap
from centinela.server.demo import LAV_SITE, MIRA_SITE
from centinela.server.records import RequisitionRecord, SiteRecord
from centinela.server.wiring import build_application


def echo_handler() -> Any:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})


def bench_bundle(data_dir: Path, floor: float = 0.0, calibrated_size: int = 0) -> Path:
    """The interim bundle with rate ceilings lifted: a load test is not bulk surveillance,
    and R14 would otherwise shed it after 1,200 requests a minute. With ``floor`` the
    watchlist's floor and alert threshold are set to it, as its owner would after
    calibrating at ``calibrated_size`` entries (``match_e2e.py --calibrated``)."""
    target = data_dir / "bench-bundle"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(packaged_root() / "interim", target)
    doc = json.loads((target / "data.json").read_text())
    for kind in doc["centinela_config"]["rate_ceilings"].values():
        kind.update(caller_per_minute=10**9, site_per_minute=10**9)
    if floor:
        watchlist = doc["centinela_config"]["galleries"]["pnp_watchlist"]
        watchlist.update(threshold_floor=floor, alert_threshold=floor)
        watchlist["calibrated_size"] = calibrated_size
    (target / "data.json").write_text(json.dumps(doc))
    return target


def populate(app: Any, n: int, batch: int = 5000) -> None:
    c = app.components
    store, records = c.matcher.store, c.records
    sites = {site.site_id for site in records.list_sites()}
    if LAV_SITE not in sites:  # the well-behaved client of benchmarks/load.py
        records.add_site(SiteRecord(LAV_SITE, "muni-la-victoria", "lima", 2, "bench", True))
    if MIRA_SITE in sites:
        c.refresh_policy_data()
        return
    records.add_site(SiteRecord(MIRA_SITE, "muni-miraflores", "lima", 2, "bench", True))
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    vecs = synth.identities(n, seed=5)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        part = vecs[start : start + batch]
        dnis = [f"{40000000 + start + i:08d}" for i in range(len(part))]
        res = store.add_templates(
            "pnp",
            "pnp_watchlist",
            c.face_model_id,
            [
                TemplateRecord(vector=v, dni=d, expires_at=expires)
                for v, d in zip(part, dnis, strict=True)
            ],
        )
        records.add_requisitions(
            [
                RequisitionRecord(
                    f"req_b{start + i:012d}",
                    sref,
                    f"W-B-{start + i:09d}",
                    "bench court",
                    "ROBO_AGRAVADO",
                    expires - dt.timedelta(days=400),
                    expires,
                    None,
                    "",
                    False,
                    (tid,),
                )
                for i, (tid, sref) in enumerate(
                    zip(res.template_ids, res.subject_refs, strict=True)
                )
            ]
        )
        print(
            f"stored {start + len(part)}/{n} ({time.perf_counter() - t0:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    c.matcher.catch_up()
    c.matcher.save_snapshots()
    c.refresh_policy_data()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--templates", type=int, default=10_000)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL URL (default: SQLite in the data dir)"
    )
    parser.add_argument(
        "--watchlist-floor", type=float, default=0.0, help="calibrated floor (0: packaged)"
    )
    args = parser.parse_args()
    logs.configure("warning")
    settings = Settings(
        data_dir=args.data_dir,
        listen="127.0.0.1:0",
        max_concurrent_rpcs=4096,
        database_url=args.database_url,
        policy_bundle=str(bench_bundle(args.data_dir, args.watchlist_floor, args.templates)),
    )
    app = await build_application(settings)
    await asyncio.to_thread(populate, app, args.templates)
    server = CentinelaServer(
        settings, app.servicers, on_stop=app.close, extra_handlers=[echo_handler()]
    )
    port = await server.start()
    freeze_startup_heap()  # as `centinela serve` does
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(1.0)))
    args.port_file.write_text(str(port))
    await server.wait()


if __name__ == "__main__":
    np.seterr(all="ignore")
    asyncio.run(main())

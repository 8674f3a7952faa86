"""Assemble the application's components from settings (the composition root)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.engine import Engine

from centinela.config import Settings
from centinela.logs import get_logger
from centinela.server.app import Servicers
from centinela.server.match_service import MatchServicer
from centinela.storage import make_engine

log = get_logger("server.wiring")


@dataclasses.dataclass
class Application:
    """The running components and the servicers built on them."""

    settings: Settings
    engine: Engine
    servicers: Servicers
    closers: list[Any] = dataclasses.field(default_factory=list)

    def reload(self) -> None:
        """SIGHUP: reload what can be reloaded without a restart (the policy bundle)."""
        log.info("reload.requested")

    async def close(self) -> None:
        """Close components in reverse order of creation."""
        for closer in reversed(self.closers):
            result = closer()
            if hasattr(result, "__await__"):
                await result
        self.engine.dispose()


async def build_application(settings: Settings) -> Application:
    """Create the data directory and every component; nothing is served yet."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.effective_database_url)
    servicers = Servicers(match=MatchServicer())
    return Application(settings=settings, engine=engine, servicers=servicers)

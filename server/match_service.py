"""MatchService: identity → validation → policy → match → durable audit → minimal response."""

from __future__ import annotations

from typing import Any

from centinela import __version__
from centinela.server.context import current_caller
from centinela.server.unimplemented import UnimplementedMatch
from centinela.v1 import match_service_pb2 as pb


class MatchServicer(UnimplementedMatch):  # type: ignore[misc]
    """The MatchService implementation."""

    def __init__(self, components: Any = None) -> None:
        self._c = components

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Any
    ) -> pb.GetServerInfoResponse:
        caller = current_caller()
        return pb.GetServerInfoResponse(
            version=__version__,
            caller_org=caller.org,
            caller_kind=caller.kind,
            caller_roles=list(caller.roles),
        )

"""Servicers that answer UNIMPLEMENTED for every RPC of a service.

Used for services (or RPCs) not built yet, so that the whole contract is registered from the
first day and a client gets a clear UNIMPLEMENTED rather than a missing service.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

from centinela.errors import Unimplemented
from centinela.v1 import (
    audit_service_pb2_grpc,
    match_service_pb2_grpc,
    registry_service_pb2_grpc,
    watchlist_service_pb2_grpc,
)


def _rpc_names(base: type) -> list[str]:
    return [name for name, fn in inspect.getmembers(base, inspect.isfunction) if name[:1].isupper()]


def unimplemented(base: type, streaming: frozenset[str] = frozenset()) -> type:
    """A subclass of a generated servicer base whose RPCs all raise ``Unimplemented``."""
    attrs: dict[str, Any] = {}
    for name in _rpc_names(base):
        if name in streaming:

            async def stream(
                self: Any, request: Any, context: Any, _n: str = name
            ) -> AsyncIterator[Any]:
                raise Unimplemented(f"{_n} is not implemented in this version")
                yield  # type: ignore[unreachable]  # makes this an async generator

            attrs[name] = stream
        else:

            async def unary(self: Any, request: Any, context: Any, _n: str = name) -> Any:
                raise Unimplemented(f"{_n} is not implemented in this version")

            attrs[name] = unary
    return type("Unimplemented" + base.__name__, (base,), attrs)


UnimplementedMatch = unimplemented(
    match_service_pb2_grpc.MatchServiceServicer,
    frozenset({"StreamMatch", "SubscribeAlerts"}),
)
UnimplementedWatchlist = unimplemented(watchlist_service_pb2_grpc.WatchlistServiceServicer)
UnimplementedRegistry = unimplemented(registry_service_pb2_grpc.RegistryServiceServicer)
UnimplementedAudit = unimplemented(
    audit_service_pb2_grpc.AuditServiceServicer, frozenset({"ExportEntries"})
)

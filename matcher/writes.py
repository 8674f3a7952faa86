"""Store changes planned outside their transaction and applied inside another one.

The server makes each administrative change atomic with its audit entry by applying the
change as a companion of the entry's own transaction (``AuditLog.append(entry,
companion=...)``). A :class:`Write` is such a change: everything that can fail for a reason
other than the database was done when it was planned.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Connection


class Write:
    """A store change planned outside its transaction, applied inside someone else's.

    ``write(conn, index)`` has the shape of an audit companion
    (:meth:`centinela.audit.log.AuditLog.append`): the change commits exactly when the audit
    entry does. Everything that can fail for a reason other than the database (validation,
    look-ups, key creation, encryption) happened when the write was planned; applying it only
    runs SQL. The planner's reads must still hold when it is applied: callers serialise
    planning and applying (the server holds one write lock from plan to commit), and unique
    constraints refuse a racing duplicate from another process (the whole transaction then
    fails closed).
    """

    def __init__(self, *steps: Callable[[Connection], None]) -> None:
        self._steps = list(steps)

    @property
    def changed(self) -> bool:
        """Whether applying it changes anything."""
        return bool(self._steps)

    def __call__(self, conn: Connection, index: int = 0) -> None:
        for step in self._steps:
            step(conn)

    def then(self, other: Write) -> Write:
        """This write, then ``other``, in the same transaction."""
        return Write(*self._steps, *other._steps)

"""Stolen-vehicle plates in the store: encrypted, found by keyed hash, with the change log.

Invariants (DESIGN.md §4; LEGAL_RULES R6): a plate is stored only as an AES-256-GCM ciphertext
under the owner's data key, bound to its reference, and looked up by HMAC of its normalised
form under the owner's index key. Every change (listing, recovery, removal) takes a new
``seq`` from the shared change counter, so the plate index replays it like templates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import NotFound
from centinela.matcher.datakeys import DataKeyring, keyed_digest
from centinela.matcher.envelope import Binding
from centinela.matcher.keys import check_owner
from centinela.matcher.plates import normalise_plate
from centinela.matcher.schema import allocate, lock_writers, new_ref, plates
from centinela.matcher.writes import Write
from centinela.storage import write_transaction

PLATE_GALLERY = "stolen_vehicles"


@dataclasses.dataclass(frozen=True)
class PlateChange:
    """One plate row of the change log (still encrypted)."""

    seq: int
    plate_ref: str
    owner: str
    key_id: str | None
    nonce: bytes | None
    ciphertext: bytes | None
    active: bool
    deleted: bool


def _binding(ref: str, key_id: str) -> Binding:
    return Binding("plate", ref, "", PLATE_GALLERY, "", key_id)


class PlateWrite(Write):
    """A plate listing planned by :meth:`PlateRecords.plan_plate`."""

    def __init__(self, plate_ref: str, created: bool, *steps: Callable[[Connection], None]) -> None:
        super().__init__(*steps)
        self.plate_ref = plate_ref
        self.created = created


class PlateRecords:
    """Plate methods of :class:`~centinela.matcher.store.TemplateStore`."""

    engine: Engine
    keyring: DataKeyring

    def plate_mac(self, text: str, *, owner: str = "pnp") -> bytes:
        """Keyed digest under which a plate is found."""
        return keyed_digest(
            self.keyring, check_owner(owner), b"plate", normalise_plate(text).encode()
        )

    def add_plate(self, text: str, *, owner: str = "pnp", active: bool = True) -> tuple[str, bool]:
        """List a plate; returns ``(plate_ref, created)``. Listing it again changes nothing.

        Raises:
            InvalidArgument: the text is not a plate.
        """
        self.plate_mac(text, owner=owner)  # validates, and creates the keys beforehand
        self.keyring.current_sealer(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            planned = self.plan_plate(text, owner=owner, active=active, conn=conn)
            planned(conn)
            return planned.plate_ref, planned.created

    def plan_plate(
        self,
        text: str,
        *,
        owner: str = "pnp",
        active: bool = True,
        conn: Connection | None = None,
    ) -> PlateWrite:
        """Planned :meth:`add_plate`: looked up and encrypted now, written when applied
        (``created`` False: already listed, and the write changes nothing).

        Raises:
            InvalidArgument: the text is not a plate.
        """
        norm = normalise_plate(text)
        mac = self.plate_mac(norm, owner=owner)
        sealer = self.keyring.current_sealer(owner)
        with contextlib.ExitStack() as stack:
            c = conn if conn is not None else stack.enter_context(self.engine.connect())
            row = c.execute(
                sa.select(plates.c.plate_ref, plates.c.deleted).where(
                    plates.c.owner == owner, plates.c.plate_mac == mac
                )
            ).first()
        if row is not None and not row.deleted:
            return PlateWrite(str(row.plate_ref), False)
        ref = str(row.plate_ref) if row is not None else new_ref("veh")
        nonce, ct = sealer.seal(norm.encode(), _binding(ref, sealer.key_id))
        values = {
            "key_id": sealer.key_id,
            "nonce": nonce,
            "plate_ct": ct,
            "active": active,
            "deleted": False,
        }
        exists = row is not None

        def step(conn: Connection) -> None:
            lock_writers(conn)
            number = allocate(conn, 1)
            if exists:
                conn.execute(
                    plates.update().where(plates.c.plate_ref == ref).values(seq=number, **values)
                )
            else:
                conn.execute(
                    plates.insert().values(
                        plate_ref=ref,
                        owner=owner,
                        plate_mac=mac,
                        created_at=dt.datetime.now(dt.UTC).isoformat(),
                        seq=number,
                        **values,
                    )
                )

        return PlateWrite(ref, True, step)

    def find_plate(self, text: str, *, owner: str = "pnp") -> str | None:
        """Reference of a listed (not removed) plate, or None."""
        mac = self.plate_mac(text, owner=owner)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(plates.c.plate_ref).where(
                    plates.c.owner == owner, plates.c.plate_mac == mac, plates.c.deleted.is_(False)
                )
            ).first()
        return None if row is None else str(row.plate_ref)

    def set_plate_active(self, plate_ref: str, active: bool) -> None:
        """Mark a vehicle recovered (``False``, R6) or stolen again.

        Raises:
            NotFound: no such listed plate.
        """
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            if not self._plate_listed(conn, plate_ref):
                raise NotFound("no such plate", field="plate_ref")
            self.plate_active_write(plate_ref, active)(conn)

    def plate_listed(self, plate_ref: str) -> bool:
        """Whether ``plate_ref`` is a listed (not removed) plate."""
        with self.engine.connect() as conn:
            return self._plate_listed(conn, plate_ref)

    @staticmethod
    def _plate_listed(conn: Connection, plate_ref: str) -> bool:
        row = conn.execute(
            sa.select(plates.c.plate_ref).where(
                plates.c.plate_ref == plate_ref, plates.c.deleted.is_(False)
            )
        ).first()
        return row is not None

    def plate_active_write(self, plate_ref: str, active: bool) -> Write:
        """Planned :meth:`set_plate_active` (the caller checked the plate is listed; a plate
        removed meanwhile is left alone)."""

        def step(conn: Connection) -> None:
            lock_writers(conn)
            conn.execute(
                plates.update()
                .where(plates.c.plate_ref == plate_ref, plates.c.deleted.is_(False))
                .values(active=active, seq=allocate(conn, 1))
            )

        return Write(step)

    def remove_plate(self, plate_ref: str) -> bool:
        """Remove a plate for good (ciphertext erased, tombstone kept for replay)."""
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            exists = conn.execute(
                sa.select(plates.c.plate_ref).where(
                    plates.c.plate_ref == plate_ref, plates.c.deleted.is_(False)
                )
            ).first()
            if exists is None:
                return False
            conn.execute(
                plates.update()
                .where(plates.c.plate_ref == plate_ref)
                .values(deleted=True, nonce=None, plate_ct=None, seq=allocate(conn, 1))
            )
            return True

    def plate_changes_since(self, after: int, *, limit: int = 10_000) -> list[PlateChange]:
        """Plate changes with ``seq > after`` in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(plates).where(plates.c.seq > after).order_by(plates.c.seq).limit(limit)
            ).all()
        return [
            PlateChange(
                seq=int(r.seq),
                plate_ref=r.plate_ref,
                owner=r.owner,
                key_id=r.key_id,
                nonce=None if r.nonce is None else bytes(r.nonce),
                ciphertext=None if r.plate_ct is None else bytes(r.plate_ct),
                active=bool(r.active),
                deleted=bool(r.deleted),
            )
            for r in rows
        ]

    def count_plate_changes_since(self, after: int) -> int:
        """How many plate changes have ``seq > after``."""
        with self.engine.connect() as conn:
            q = sa.select(sa.func.count()).select_from(plates).where(plates.c.seq > after)
            return int(conn.execute(q).scalar_one())

    def open_plate(self, change: PlateChange) -> str:
        """Decrypt a plate change's text.

        Raises:
            NotFound: the change is a removal.
            KeyNotFound, DecryptionError: key destroyed, or ciphertext moved or altered.
        """
        if change.deleted or change.ciphertext is None or change.nonce is None:
            raise NotFound("plate was removed", field="plate_ref")
        sealer = self.keyring.sealer(change.owner, str(change.key_id))
        raw = sealer.open(
            change.nonce, change.ciphertext, _binding(change.plate_ref, str(change.key_id))
        )
        return raw.decode()

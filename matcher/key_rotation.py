"""Key rotation and crypto-shredding for the template store.

Invariants (DESIGN.md §4; NIST SP 800-57 Part 1 §5.3 on cryptoperiods; NIST SP 800-88 on
cryptographic erase):

* KEK rotation re-wraps the owner's data keys; no record is touched and serving goes on.
* Data-key rotation makes a new key current at once (new writes use it); :meth:`reencrypt`
  then moves records from older keys in small transactions while reads keep working (every
  row names its key), and retires an older key once no row uses it. Re-encryption does not
  change a record's ``seq``: the indexed content is the same.
* :meth:`shred_owner` destroys the owner's KEKs *first* — from then on its data keys, hence
  its templates, DNIs, plates and snapshots, cannot be recovered from any copy of the
  database — then erases its ciphertexts and tombstones every record with a new ``seq``, so
  every matcher replaying the change log empties the owner's galleries.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from centinela.matcher.datakeys import DataKeyring
from centinela.matcher.envelope import Binding
from centinela.matcher.keys import KeyProvider, check_owner
from centinela.matcher.schema import allocate, lock_writers, plates, subjects, templates
from centinela.storage import write_transaction


class KeyRotation:
    """Key methods of :class:`~centinela.matcher.store.TemplateStore`."""

    engine: Engine
    keyring: DataKeyring
    keys: KeyProvider

    def rotate_kek(self, owner: str) -> str:
        """Rotate the owner's KEK (re-wrap its data keys); returns the new KEK id."""
        return self.keyring.rotate_kek(check_owner(owner))

    def rotate_data_key(self, owner: str) -> str:
        """Make a new data key current for the owner; call :meth:`reencrypt` afterwards."""
        return self.keyring.rotate_data_key(check_owner(owner))

    def reencrypt(self, owner: str, *, batch: int = 1000) -> int:
        """Move every record of ``owner`` to its current data key; returns records moved.

        Older data keys that no record uses any more are retired at the end.
        """
        check_owner(owner)
        current, _ = self.keyring.current(owner, "data")
        new = self.keyring.sealer(owner, current)
        moved = 0
        while True:
            with write_transaction(self.engine) as conn:
                rows = conn.execute(
                    sa.select(templates)
                    .where(
                        templates.c.owner == owner,
                        templates.c.deleted.is_(False),
                        templates.c.key_id != current,
                    )
                    .limit(batch)
                ).all()
                for r in rows:
                    old_b = Binding(
                        "template", r.template_id, r.subject_ref, r.gallery, r.model_id, r.key_id
                    )
                    raw = self.keyring.sealer(owner, r.key_id).open(
                        bytes(r.nonce), bytes(r.ciphertext), old_b
                    )
                    new_b = Binding(
                        "template", r.template_id, r.subject_ref, r.gallery, r.model_id, current
                    )
                    nonce, ct = new.seal(raw, new_b)
                    conn.execute(
                        templates.update()
                        .where(
                            templates.c.template_id == r.template_id, templates.c.key_id == r.key_id
                        )
                        .values(key_id=current, nonce=nonce, ciphertext=ct)
                    )
                moved += len(rows)
            if len(rows) < batch:
                break
        while True:
            with write_transaction(self.engine) as conn:
                srows = conn.execute(
                    sa.select(subjects)
                    .where(
                        subjects.c.owner == owner,
                        subjects.c.dni_ct.is_not(None),
                        subjects.c.key_id != current,
                    )
                    .limit(batch)
                ).all()
                for r in srows:
                    raw = self.keyring.sealer(owner, r.key_id).open(
                        bytes(r.nonce),
                        bytes(r.dni_ct),
                        Binding("dni", r.subject_ref, r.subject_ref, "", "", r.key_id),
                    )
                    nonce, ct = new.seal(
                        raw, Binding("dni", r.subject_ref, r.subject_ref, "", "", current)
                    )
                    conn.execute(
                        subjects.update()
                        .where(
                            subjects.c.subject_ref == r.subject_ref, subjects.c.key_id == r.key_id
                        )
                        .values(key_id=current, nonce=nonce, dni_ct=ct)
                    )
                moved += len(srows)
            if len(srows) < batch:
                break
        while True:
            with write_transaction(self.engine) as conn:
                prows = conn.execute(
                    sa.select(plates)
                    .where(
                        plates.c.owner == owner,
                        plates.c.deleted.is_(False),
                        plates.c.key_id != current,
                    )
                    .limit(batch)
                ).all()
                for r in prows:
                    raw = self.keyring.sealer(owner, r.key_id).open(
                        bytes(r.nonce),
                        bytes(r.plate_ct),
                        Binding("plate", r.plate_ref, "", "stolen_vehicles", "", r.key_id),
                    )
                    nonce, ct = new.seal(
                        raw, Binding("plate", r.plate_ref, "", "stolen_vehicles", "", current)
                    )
                    conn.execute(
                        plates.update()
                        .where(plates.c.plate_ref == r.plate_ref, plates.c.key_id == r.key_id)
                        .values(key_id=current, nonce=nonce, plate_ct=ct)
                    )
                moved += len(prows)
            if len(prows) < batch:
                break
        for key_id, state in self.keyring.key_ids(owner, "data"):
            if state == "previous" and not self._key_in_use(key_id):
                self.keyring.retire(owner, key_id)
        return moved

    def _key_in_use(self, key_id: str) -> bool:
        with self.engine.connect() as conn:
            for table in (templates, subjects, plates):
                q = sa.select(sa.func.count()).select_from(table).where(table.c.key_id == key_id)
                if int(conn.execute(q).scalar_one()):
                    return True
        return False

    def shred_owner(self, owner: str) -> int:
        """Crypto-shred every template, DNI and plate of ``owner``; returns templates shredded."""
        check_owner(owner)
        self.keys.destroy_owner(owner)
        self.keyring.forget_owner(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            ids = [
                str(r.template_id)
                for r in conn.execute(
                    sa.select(templates.c.template_id)
                    .where(templates.c.owner == owner, templates.c.deleted.is_(False))
                    .order_by(templates.c.seq)
                )
            ]
            refs = [
                str(r.plate_ref)
                for r in conn.execute(
                    sa.select(plates.c.plate_ref)
                    .where(plates.c.owner == owner, plates.c.deleted.is_(False))
                    .order_by(plates.c.seq)
                )
            ]
            first = allocate(conn, len(ids) + len(refs)) if ids or refs else 0
            if ids:
                conn.execute(
                    templates.update()
                    .where(templates.c.template_id == sa.bindparam("b_tid"))
                    .values(seq=sa.bindparam("b_seq"), deleted=True, nonce=None, ciphertext=None),
                    [{"b_tid": t, "b_seq": first + i} for i, t in enumerate(ids)],
                )
            if refs:
                conn.execute(
                    plates.update()
                    .where(plates.c.plate_ref == sa.bindparam("b_ref"))
                    .values(
                        seq=sa.bindparam("b_seq"),
                        deleted=True,
                        nonce=None,
                        plate_ct=None,
                        plate_mac=None,
                    ),
                    [{"b_ref": r, "b_seq": first + len(ids) + i} for i, r in enumerate(refs)],
                )
            # Erased ciphertexts of already-removed rows too: nothing of the owner stays.
            conn.execute(
                templates.update()
                .where(templates.c.owner == owner)
                .values(nonce=None, ciphertext=None)
            )
            conn.execute(
                subjects.update()
                .where(subjects.c.owner == owner)
                .values(dni_mac=None, dni_ct=None, nonce=None, key_id=None)
            )
            self.keyring.destroy_owner(conn, owner)
        return len(ids)

"""centinela.audit: the tamper-evident audit log.

``merkle`` (RFC 9162 tree and proofs), ``entry`` (canonical entries and keyed digests),
``store`` (append-only tables), ``checkpoint`` (C2SP signed checkpoints), ``log`` (the
group-committed :class:`~centinela.audit.log.AuditLog` the server holds), ``keys`` (key files),
``export`` and ``verify`` (offline verification), ``cli`` (``centinela audit export|verify``).
"""

"""File names of an audit export directory, shared by the exporter and the offline verifier."""

from __future__ import annotations

EXPORT_FORMAT = "centinela-audit-export/1"
ENTRIES = "entries.jsonl"
CHECKPOINT = "checkpoint"
PUBKEY = "log.pub"
RANGE = "range.json"
LEAF_HINTS = "leaf-hashes.bin"

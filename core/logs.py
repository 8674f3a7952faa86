"""Structured JSON logs (structlog) that never carry biometric data, plates, DNIs or names.

Invariant: a log event holds identifiers (request id, decision id, caller organisation, site
id, pseudonymous references) and counts, never personal fields. As a second line of defence
the :func:`redact` processor drops any key whose name says it holds personal or secret data,
so a careless ``log.info(..., plate=...)`` does not leak.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

#: Keys never written to a log, whatever their value.
FORBIDDEN_KEYS = frozenset(
    {
        "vector",
        "vectors",
        "embedding",
        "probe",
        "template",
        "templates",
        "plate",
        "plate_text",
        "alternatives",
        "dni",
        "name",
        "full_name",
        "image",
        "key",
        "secret",
        "password",
        "private_key",
    }
)


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: replace forbidden keys' values with ``"[redacted]"``."""
    for k in list(event_dict):
        if k.lower() in FORBIDDEN_KEYS:
            event_dict[k] = "[redacted]"
    return event_dict


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for JSON lines on ``stream`` (default stderr)."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A bound structlog logger carrying ``component=name``."""
    # A lazy proxy: it binds at first use, after ``configure`` ran, even when created at
    # import time.
    return structlog.get_logger(component=name)

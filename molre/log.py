"""structlog set-up, done once per process.

Humans get a coloured console renderer; the service (or `--log-json`) gets one JSON object per
line so log shippers can index it. Never pass patient names, IDs or birth dates to a logger: log
UIDs, hashes and counts.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever sys.stderr is *now* (test runners swap and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(json_output: bool = False, level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger (pynetdicom logs through stdlib)."""
    global _configured
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # stdlib loggers (pynetdicom, alembic) go to stderr at WARNING unless we are verbose.
    logging.basicConfig(stream=sys.stderr, level=max(lvl, logging.WARNING), force=True)
    logging.getLogger("pynetdicom").setLevel(max(lvl, logging.WARNING))
    _configured = True


def get_logger(name: str | None = None, **bound) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger; configures console logging on first use if nobody did."""
    if not _configured:
        configure_logging()
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log

"""structlog set-up, once per process, and what keeps PHI and raw bytes out of the logs.

Humans get a coloured console; the service (or `--log-json`) one JSON object per line. Never
pass patient names, IDs or birth dates to a logger: log UIDs, hashes and counts.

Text the node does not write itself reaches the logs too (library warnings and log records,
exception texts) and may quote header values, control characters included, so
:func:`configure_logging` routes all of it through structlog: warnings, standard-library records
and exception messages pass :func:`redact` (quoted values removed), exceptions are rendered as
frames plus a redacted message, uncaught ones are logged the same way (JSON mode), and every
string loses its control characters. :func:`redact` and :func:`clean_text` also clean exception
texts before they become audit rows.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
import warnings
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor

_configured = False
_json = False

#: C0 and C1 control characters and DEL (newline, tab, ESC of ANSI sequences included)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
#: quoted values, greedy from the first to the last quote of a kind: a value that contains the
#: quote character itself cannot leave a part of it outside the redaction
_QUOTED = (re.compile(r'".*"|".*$', re.S), re.compile(r"'.*'|'.*$", re.S))
#: reprs of bytes (b'...' / b"...") are values too
_BYTES = re.compile(r"""b(['"]).*?\1""", re.S)
REDACTED = "<value>"


def clean_text(text: Any, limit: int = 500) -> str:
    """``text`` without control characters (runs become one space), at most ``limit`` chars.

    For messages the node composes itself (they may embed UIDs and numbers, never PHI)."""
    out = _CONTROL.sub(" ", str(text)).strip()
    return out if len(out) <= limit else out[: limit - 1] + "…"


def redact(text: Any, limit: int = 300) -> str:
    """Foreign text (a library's exception or warning) made safe for logs and audit rows:
    quoted values -- how pydicom, highdicom and Python quote what they complain about -- and
    byte reprs are replaced by ``<value>``, control characters removed, length capped."""
    out = _BYTES.sub(REDACTED, str(text))
    out = _CONTROL.sub(" ", out)
    for pattern in _QUOTED:
        out = pattern.sub(REDACTED, out)
    return clean_text(out, limit)


def _safe_exception(exc: BaseException) -> str:
    """A traceback without values: frames (file:line in function) and the redacted message."""
    frames = traceback.extract_tb(exc.__traceback__)[-8:]
    lines = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
    lines.append(f"{type(exc).__name__}: {redact(str(exc))}")
    return " | ".join(lines)


def _exc_processor(_: Any, __: str, event: EventDict) -> EventDict:
    """``exc_info`` -> ``exception`` as :func:`_safe_exception` renders it."""
    info = event.pop("exc_info", None)
    if info:
        if info is True:
            info = sys.exc_info()
        elif isinstance(info, BaseException):
            info = (type(info), info, info.__traceback__)
        if isinstance(info, tuple) and info[1] is not None:
            event["exception"] = _safe_exception(info[1])
    return event


def _clean_processor(_: Any, __: str, event: EventDict) -> EventDict:
    """No control characters in any string value (nor in list items)."""
    for key, value in list(event.items()):
        if isinstance(value, str):
            if _CONTROL.search(value):
                event[key] = _CONTROL.sub(" ", value)
        elif isinstance(value, (list, tuple)):
            event[key] = [_CONTROL.sub(" ", v) if isinstance(v, str) else v for v in value]
    return event


def _foreign_processor(_: Any, __: str, event: EventDict) -> EventDict:
    """A standard-library record's message is foreign text: redacted."""
    record = event.get("_record")
    if record is not None and not getattr(record, "_log_safe", False):
        event["event"] = redact(event.get("event", ""))
    return event


class _CurrentStderr:
    """Writes to whatever sys.stderr is *now* (test runners swap and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _showwarning(
    message: Any,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning``: one structured record, the message redacted."""
    structlog.get_logger("py.warnings").warning(
        "python warning",
        category=getattr(category, "__name__", str(category)),
        source=f"{filename.rsplit('/', 1)[-1]}:{lineno}",
        message=redact(str(message)),
    )


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        return
    structlog.get_logger("uncaught").error(
        "uncaught exception", exception=_safe_exception(exc.with_traceback(tb))
    )


def _thread_excepthook(args: Any) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger("uncaught").error(
        "uncaught exception in thread",
        thread=getattr(args.thread, "name", None),
        exception=_safe_exception(args.exc_value.with_traceback(args.exc_traceback)),
    )


def _unraisablehook(args: Any) -> None:
    """ "Exception ignored in ..." (a failing __del__, a callback): a record, not raw text."""
    exc = args.exc_value
    structlog.get_logger("uncaught").warning(
        "exception ignored",
        where=redact(repr(getattr(args, "object", None)), 120),
        exception=_safe_exception(exc) if exc is not None else None,
    )


def configure_logging(json_output: bool = False, level: str = "INFO") -> None:
    """Configure structlog and route the standard library's logging, warnings and uncaught
    exceptions through it (see the module docstring)."""
    global _configured, _json
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    shared: list[Processor] = [
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
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            _exc_processor,
            _clean_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # WriteLogger: each record is ONE write (message + newline). PrintLogger's print() wrote the
        # message and the newline separately, and a stdlib-logging line from another thread could
        # land between them: two JSON records on one line (seen in a node's log under load).
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    # stdlib loggers (pynetdicom, pydicom, alembic) go to stderr at WARNING unless we are
    # verbose, rendered like structlog's own records
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _foreign_processor],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _exc_processor,
                _clean_processor,
                renderer,
            ],
        )
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), handlers=[handler], force=True)
    logging.getLogger("pynetdicom").setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(False)
    warnings.showwarning = _showwarning
    if json_output:
        sys.excepthook = _excepthook
        threading.excepthook = _thread_excepthook
        sys.unraisablehook = _unraisablehook
    _configured = True
    _json = bool(json_output)


def json_logging() -> bool:
    """Whether stderr carries JSON lines (only JSON may be written there then)."""
    return _json


def banner(text: str, **fields: Any) -> None:
    """The start-up banner: a plain line for a human, one JSON record in JSON mode."""
    if _json:
        structlog.get_logger("banner").info(clean_text(text, 2000), **fields)
    else:
        print(text, file=sys.stderr, flush=True)


def get_logger(name: str | None = None, **bound) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger; configures console logging on first use if nobody did."""
    if not _configured:
        configure_logging()
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log


__all__ = [
    "REDACTED",
    "banner",
    "clean_text",
    "configure_logging",
    "get_logger",
    "json_logging",
    "redact",
]

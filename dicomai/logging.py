"""Logging set-up for the entry point; library modules only call ``structlog.get_logger``.

JSON lines on stdout when stdout is not a terminal (systemd, containers), coloured
key/value output on a terminal. The stdlib records of our dependencies (pynetdicom,
pydicom, apscheduler), Python warnings and the tracebacks of crashed threads take the same
way and the same format. Event names are short verbs (``study.stable``); values are
fields. Patient names and IDs are never logged: only UIDs, counts, hashes and AE titles.
"""

from __future__ import annotations

import logging
import sys
import threading

import structlog

from dicomai.config import LogFormat, LoggingConfig

__all__ = ["configure_logging"]

_FORBIDDEN_KEYS = frozenset({"patient_name", "patient_id", "PatientName", "PatientID"})

log = structlog.get_logger("dicomai.logging")


def _drop_patient_fields(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Last line of defence: a patient identifier passed by mistake never reaches output."""
    for key in _FORBIDDEN_KEYS & event_dict.keys():
        event_dict[key] = "<redacted>"
    return event_dict


class _Standard:
    """``sys.stdout`` or ``sys.stderr`` looked up at every write, not once: whoever replaces
    the process's stream later (a test runner's capture, a daemoniser) still gets the lines,
    and a logger never writes to a stream that was closed behind its back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return int(getattr(sys, self.name).write(text))

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def isatty(self) -> bool:
        return bool(getattr(sys, self.name).isatty())


def configure_logging(config: LoggingConfig, stream: object | None = None) -> None:
    """Configure structlog (and the stdlib loggers of our dependencies) once per process."""
    out = stream if stream is not None else sys.stdout
    if out is sys.stdout or out is sys.stderr:
        out = _Standard("stdout" if out is sys.stdout else "stderr")
    use_json = config.format == LogFormat.JSON or (
        config.format == LogFormat.AUTO and not getattr(out, "isatty", lambda: False)()
    )
    level = logging.getLevelNamesMapping()[config.level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_patient_fields,
    ]
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    _route_stdlib(out, shared, renderer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per record (message and newline together), as the stdlib handler below
        # does: two writers on one stream then cannot splice a line into another one.
        logger_factory=structlog.WriteLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # pynetdicom logs every PDU at INFO and may print identifiers from requests; keep it
    # at WARNING so its messages do not leak patient data into the journal.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" whenever one study takes longer
    # than the poll interval: expected, not a warning for an admin.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    # pydicom logs a traceback for each decoder plugin it tries; dicomai reports the
    # resulting failure itself (event and audit row), so only keep pydicom's critical ones.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


class _StructlogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler :func:`configure_logging` installs (and replaces when called again)."""


def _route_stdlib(out: object, shared: list[structlog.typing.Processor],
                  renderer: structlog.typing.Processor) -> None:
    """Send stdlib logging, warnings and crashed threads' tracebacks through structlog.

    Records of other libraries get the same level, timestamp and redaction as ours, their
    logger's name and, with ``exc_info``, the traceback as a field of the same JSON line.
    """
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _StructlogHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    threading.excepthook = _thread_crashed


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    """A thread died of an exception: one log record with its traceback, not raw stderr."""
    if args.exc_type is SystemExit:
        return
    assert args.exc_value is not None
    log.error("thread.crashed", thread=args.thread.name if args.thread else None,
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

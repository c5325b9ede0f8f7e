"""The one exception hierarchy of dicomai.

Every error a person may need to act on derives from :class:`DicomaiError` and carries
the data that identifies what went wrong (a configuration key, a database revision,
a peer), never a patient name or ID.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseBehindError",
    "DatabaseError",
    "DicomaiError",
    "InUseError",
    "IngestError",
    "SpoolFullError",
    "UsageError",
]


class DicomaiError(Exception):
    """Base class of every error raised by dicomai on purpose."""

    exit_code = 1


class ConfigError(DicomaiError):
    """A configuration key or value is invalid.

    Attributes
    ----------
    key:
        The dotted configuration key (``node.port``), or the file/variable at fault.
    source:
        Where the bad value came from (a file's path, an environment variable, the command
        line), when that is not ``key`` itself.
    """

    exit_code = 2

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"configuration error: {key}{where}: {message}")
        self.key = key
        self.message = message
        self.source = source


class UsageError(DicomaiError):
    """An operator's mistake the command cannot work around: a missing extra, a bad value."""

    exit_code = 2


class InUseError(UsageError):
    """A resource the node needs for itself is held by another process.

    Attributes
    ----------
    resource:
        What is in use, as a person names it (``port 11112 on 0.0.0.0``, a data directory).
    """

    def __init__(self, resource: str, detail: str) -> None:
        super().__init__(f"{resource} is in use{detail}")
        self.resource = resource


class DatabaseError(DicomaiError):
    """The audit database cannot be used as it is."""

    exit_code = 3


class DatabaseBehindError(DatabaseError):
    """The audit database schema is older (or newer) than this version of dicomai expects."""

    def __init__(self, url: str, current: str | None, expected: str) -> None:
        super().__init__(
            f"audit database {url} is at schema revision {current or '(none)'} but this "
            f"dicomai needs {expected}; run `dicomai db upgrade` (with the same --config) first"
        )
        self.url = url
        self.current = current
        self.expected = expected


class IngestError(DicomaiError):
    """A received object cannot be accepted; carries the DIMSE status to answer with.

    Attributes
    ----------
    status:
        The C-STORE response status (PS3.4 Annex B / PS3.7 Annex C).
    reason:
        A short, patient-free explanation recorded in the audit log.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"0x{status:04X}: {reason}")
        self.status = status
        self.reason = reason


class SpoolFullError(IngestError):
    """The data directory has less free space than configured; refuse with 0xA700."""

    def __init__(self, free_bytes: int, min_free_bytes: int) -> None:
        super().__init__(
            0xA700,
            f"out of resources: {free_bytes // 2**20} MiB free, "
            f"{min_free_bytes // 2**20} MiB required",
        )
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes

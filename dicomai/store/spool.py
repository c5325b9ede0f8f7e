"""The durable spool: received objects on disk before they are acknowledged.

Layout under the data directory::

    spool/<StudyInstanceUID>/<SOPInstanceUID>.<sha256[:16]>.dcm   accepted instances
    quarantine/<UTC time>-<sha256[:12]>.dcm (+ .json)            rejected objects, kept
    tmp/                                                         partial writes only

A file is written to ``tmp/``, flushed and fsynced, then renamed into place and its
directory fsynced, so after a crash a path in the spool is either absent or complete.
Spool paths are content-addressed: re-writing the same object is harmless.

Received objects hold patient data: folders are 0700 and files 0600 whatever the umask.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicomai.errors import IngestError, SpoolFullError

__all__ = ["Spool", "is_valid_uid"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Serialises creating folders in the spool (Spool._durable_dir), across Spool objects.
_DIRS_LOCK = threading.Lock()


def is_valid_uid(value: str) -> bool:
    """A UID safe to use as a file name: digits and dots, at most 64 characters."""
    return 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@dataclass(frozen=True)
class Spool:
    """File operations on one data directory."""

    root: Path
    fsync: bool = True
    min_free_bytes: int = 0

    @property
    def spool_dir(self) -> Path:
        return self.root / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def prepare(self) -> int:
        """Create the folders (0700, also when they exist); remove partial writes left by a
        crash. Returns how many."""
        for d in (self.root, self.spool_dir, self.quarantine_dir, self.tmp_dir):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            d.chmod(DIR_MODE)  # mkdir's mode is masked by the umask and ignored when d exists
        leftovers = list(self.tmp_dir.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`SpoolFullError` (0xA700) when the disk is nearly full."""
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(free, self.min_free_bytes)

    def instance_path(self, study_uid: str, sop_uid: str, sha256: str) -> Path:
        if not (is_valid_uid(study_uid) and is_valid_uid(sop_uid)):
            raise ValueError("UIDs must be validated before building a spool path")
        return self.spool_dir / study_uid / f"{sop_uid}.{sha256[:16]}.dcm"

    def write_instance(self, study_uid: str, sop_uid: str, sha256: str, chunks: list[bytes]) -> Path:
        """Durably write one instance; returns its final path."""
        final = self.instance_path(study_uid, sop_uid, sha256)
        self._durable_write(final, chunks)
        return final

    def quarantine(self, chunks: list[bytes], sha256: str, meta: dict[str, object]) -> Path:
        """Keep a rejected object for inspection, with a JSON sidecar saying why."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        final = self.quarantine_dir / f"{stamp}-{sha256[:12]}.dcm"
        self._durable_write(final, chunks)
        sidecar = final.with_suffix(".json")
        self._durable_write(sidecar, [json.dumps(meta, indent=2, default=str).encode()])
        return final

    def write_file(self, final: Path, chunks: list[bytes]) -> None:
        """Durably write any file under the data directory (tmp, fsync, rename, fsync dir)."""
        self._durable_write(final, chunks)

    def write_temp(self, chunks: list[bytes]) -> Path:
        """Durably write ``chunks`` to a new file in ``tmp/``; :meth:`place` names it.

        The first half of a durable write, for callers that learn the final name (or that
        the object is kept at all) while the bytes go to disk.
        """
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            # Created 0600 (the umask can only remove bits), kept by the rename.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with open(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        return tmp

    def place(self, tmp: Path, final: Path) -> Path:
        """Rename a file from :meth:`write_temp` to ``final`` and make the rename durable."""
        try:
            self._durable_dir(final.parent)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        if self.fsync:
            _fsync_dir(final.parent)
        return final

    def _durable_dir(self, folder: Path) -> None:
        """Create ``folder`` (0700) if needed, its entry in its parent fsynced before return.

        Under one lock: a second association storing into a study folder another has just
        created must not rename into it before the folder itself is on disk.
        """
        with _DIRS_LOCK:
            if folder.exists():
                return
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            folder.chmod(DIR_MODE)
            if self.fsync:
                _fsync_dir(folder.parent)

    def _durable_write(self, final: Path, chunks: list[bytes]) -> None:
        self.place(self.write_temp(chunks), final)


def _raise_if_full(exc: OSError) -> None:
    """0xA700 for a full disk or quota (any other error is the caller's to re-raise)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise IngestError(0xA700, "out of resources: disk full while writing") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

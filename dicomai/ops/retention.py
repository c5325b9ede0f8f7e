"""The retention purge: deletes the files of finished studies by age, and under disk pressure.

What may go is decided in SQL (:mod:`dicomai.store.retention`); this module deletes the files,
in an order that a ``kill -9`` at any point cannot break: the rows are marked purged and
committed, then their files are deleted, then the run is recorded done. So a row whose file
is missing always says why, and the next purge first deletes the files of rows marked since
the last run that was done (what a killed one left).

A run, :func:`purge`:

1. deletes what an interrupted run left;
2. by age: each kind of file ``retention.<kind>_days`` after its study was completed
   (quarantined objects: after they arrived); 0 days keeps that kind forever;
3. by disk pressure: above ``retention.high_watermark_pct`` used, every file of the finished
   study completed first, one study at a time, then the oldest quarantined objects, until the
   file system is below ``retention.low_watermark_pct``.

One run at a time per data directory (``.purge.lock``): the node's scheduled one
(:class:`RetentionJob`) or ``dicomai purge``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Settings
from dicomai.errors import InUseError
from dicomai.store import retention as store
from dicomai.store.models import utcnow
from dicomai.store.retention import FileKind, PurgeFile

__all__ = ["DiskUsage", "Doomed", "PurgeReport", "PurgeRunningError", "RetentionJob", "disk_usage", "purge",
           "remove_file"]

log = structlog.get_logger("dicomai.retention")

#: Used and total bytes of the file system holding a path.
DiskUsage = Callable[[Path], tuple[int, int]]
#: Deletes one file (absent is fine).
Remove = Callable[[Path], None]
LOCK = ".purge.lock"
_BATCH = 500  # rows marked per transaction by the age purge
_QUARANTINE_BATCH = 50  # quarantined objects per round under disk pressure
_AGES = ((FileKind.INSTANCE, "instances_days"), (FileKind.RESULT, "results_days"),
         (FileKind.MAP, "maps_days"), (FileKind.QUARANTINE, "quarantine_days"))


class PurgeRunningError(InUseError):
    """Another purge holds the data directory's purge lock."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(f"the purge of {data_dir}",
                         " by another purge (the node's scheduled one or dicomai purge); try again later")


@dataclass(frozen=True)
class Doomed:
    """A file purged (or, in a dry run, that would be) and why."""

    file: PurgeFile
    reason: str
    size: int  # bytes on disk when it was looked at; 0 when already gone


@dataclass
class PurgeReport:
    """What one run did (or, with ``dry_run``, would do)."""

    dry_run: bool
    used_pct: float  # of the data directory's file system, at the start
    used_pct_after: float  # at the end; a dry run's estimate
    pressure: bool  # above the high watermark (after the age purge)
    files: list[Doomed] = field(default_factory=list)
    leftovers: list[PurgeFile] = field(default_factory=list)  # marked by an interrupted run
    unrelieved: bool = False  # still above the low watermark, nothing left that may go

    @property
    def size(self) -> int:
        return sum(d.size for d in self.files)


def disk_usage(path: Path) -> tuple[int, int]:
    """Used and total bytes (as ``df`` counts them: used + available) of ``path``'s file system."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.used, usage.used + usage.free


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PurgeRunningError(data_dir) from None
        yield
    finally:
        os.close(fd)  # releases the lock, as does the process's end however it ends


def _pct(used: int, total: int) -> float:
    return 100.0 * used / total if total else 0.0


class _Run:
    """One purge: selection through the store, marks committed before any file is deleted."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], usage: DiskUsage,
                 remove: Remove, dry_run: bool) -> None:
        self.root = settings.data_dir
        self.r = settings.retention
        self.sessions = sessions
        self.usage = usage
        self.remove = remove
        self.dry_run = dry_run

    def _paths(self, f: PurgeFile) -> list[Path]:
        path = self.root / f.path
        return [path, path.with_suffix(".json")] if f.kind is FileKind.QUARANTINE else [path]

    def _size(self, f: PurgeFile) -> int:
        total = 0
        for p in self._paths(f):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def _delete(self, files: list[PurgeFile]) -> None:
        for f in files:
            for p in self._paths(f):
                self.remove(p)

    def leftovers(self) -> list[PurgeFile]:
        with self.sessions() as s:
            marked = store.marked_since(s, store.last_done(s))
            s.rollback()
        left = [f for f in marked if any(p.exists() for p in self._paths(f))]
        if not self.dry_run:
            self._delete(left)
        return left

    def batch(self, files: list[PurgeFile], reason: str) -> list[Doomed]:
        """Mark (commit), then delete; returns the files marked (a dry run: all of them)."""
        if not files:
            return []
        if not self.dry_run:
            with self.sessions.begin() as s:
                marked = {(f.kind, f.row_id) for f in store.mark_purged(s, files, reason, utcnow())}
            files = [f for f in files if (f.kind, f.row_id) in marked]
        doomed = [Doomed(f, reason, self._size(f)) for f in files]
        if not self.dry_run:
            self._delete(files)
        return doomed

    def by_age(self, now: dt.datetime) -> list[Doomed]:
        out: list[Doomed] = []
        for kind, key in _AGES:
            days: float = getattr(self.r, key)
            if not days:
                continue
            cutoff = now - dt.timedelta(days=days)
            since = "arrival" if kind is FileKind.QUARANTINE else "completion"
            reason = f"kept {days:g} days after {since} (retention.{key})"
            while True:
                with self.sessions() as s:
                    files = store.aged_files(s, kind, cutoff, None if self.dry_run else _BATCH)
                    s.rollback()
                done = self.batch(files, reason)
                out += done
                if self.dry_run or not done or len(files) < _BATCH:
                    break
        return out

    def by_pressure(self, used: int, total: int, report: PurgeReport) -> None:
        """Oldest finished study first, then the oldest quarantined objects, until below the
        low watermark (a dry run estimates from the files' sizes)."""
        reason = (f"disk {_pct(used, total):.1f}% used, above retention.high_watermark_pct "
                  f"{self.r.high_watermark_pct:g}")
        target = self.r.low_watermark_pct * total / 100
        seen_studies: set[int] = set()
        seen_quarantine: set[int] = set()
        while used > target:
            with self.sessions() as s:
                study = next((st for st in store.finished_studies(s, len(seen_studies) + 1)
                              if st.study_id not in seen_studies), None)
                if study is not None:
                    seen_studies.add(study.study_id)
                    files = store.study_files(s, [study.study_id])
                else:
                    files = [f for f in store.oldest_quarantined(s, len(seen_quarantine) + _QUARANTINE_BATCH)
                             if f.row_id not in seen_quarantine][:_QUARANTINE_BATCH]
                    seen_quarantine.update(f.row_id for f in files)
                s.rollback()
            if not files:
                report.unrelieved = True
                break
            done = self.batch(files, reason)
            report.files += done
            if self.dry_run:
                used -= sum(d.size for d in done)
            else:
                used, total = self.usage(self.root)
        report.used_pct_after = _pct(used, total)


def purge(settings: Settings, sessions: sessionmaker[Session], *, now: dt.datetime | None = None,
          usage: DiskUsage = disk_usage, remove: Remove = remove_file, dry_run: bool = False) -> PurgeReport:
    """One retention run (see the module docstring); a dry run only says what would go.

    Parameters
    ----------
    now:
        The moment ages are counted to (default: now).
    usage:
        Used and total bytes of the data directory's file system.
    remove:
        Deletes one file.

    Raises
    ------
    PurgeRunningError
        Another purge is running on this data directory (never for a dry run).
    """
    run = _Run(settings, sessions, usage, remove, dry_run)
    lock = contextlib.nullcontext() if dry_run else _locked(settings.data_dir)
    with lock:
        before = usage(settings.data_dir)
        leftovers = run.leftovers()
        aged = run.by_age(now or utcnow())
        if dry_run:
            used, total = before[0] - sum(d.size for d in aged), before[1]
        else:
            used, total = usage(settings.data_dir)
        r = settings.retention
        pressure = bool(r.high_watermark_pct) and _pct(used, total) > r.high_watermark_pct
        report = PurgeReport(dry_run, _pct(*before), _pct(used, total), pressure, aged, leftovers)
        if pressure:
            run.by_pressure(used, total, report)
        if not dry_run and (report.files or leftovers):
            with sessions.begin() as s:
                store.record_done(s, {"files": len(report.files), "bytes": report.size,
                                      "leftovers": len(leftovers), "used_pct": round(report.used_pct, 1),
                                      "used_pct_after": round(report.used_pct_after, 1)})
    if report.files or leftovers or pressure:
        counts: dict[str, int] = {}
        for d in report.files:
            counts[d.file.kind.value] = counts.get(d.file.kind.value, 0) + 1
        log.info("retention.dry_run" if dry_run else "retention.purged", files=counts, bytes=report.size,
                 leftovers=len(leftovers), used_pct=round(report.used_pct, 1),
                 used_pct_after=round(report.used_pct_after, 1), pressure=pressure)
    if report.unrelieved:
        log.warning("retention.pressure_unrelieved", used_pct=round(report.used_pct_after, 1),
                    low_watermark_pct=r.low_watermark_pct,
                    hint="nothing finished is left to purge: studies wait for processing or delivery")
    return report


class RetentionJob:
    """The node's scheduled purge; skips a round while ``dicomai purge`` runs."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def __call__(self) -> None:
        try:
            purge(self.settings, self.sessions)
        except PurgeRunningError:
            log.info("retention.skipped", reason="another purge is running")

"""The running drift watch: the last days' images of the model in use against its reference,
for ``/metrics`` and a periodic warning in the log."""

from __future__ import annotations

import datetime as dt
import threading
import time

import structlog
from sqlalchemy.orm import Session, sessionmaker

from dicomai.model.drift import PSI_WARN, Drift, drifted_groups, watch
from dicomai.model.package import Manifest, OperatingPoints
from dicomai.store.drift import image_samples, latest_prediction

__all__ = ["DriftWatch"]

log = structlog.get_logger("dicomai.model")


class DriftWatch:
    """Drift of the images analysed by ``manifest``'s model in the last ``window_days``, per
    group (:func:`dicomai.model.drift.watch`). The query reads every score of the window, so a
    scrape reuses the last result while no image was analysed since and it is less than
    ``max_age_s`` old (the window moves on)."""

    def __init__(self, sessions: sessionmaker[Session], manifest: Manifest, points: OperatingPoints,
                 window_days: float, max_age_s: float = 60.0) -> None:
        if manifest.reference is None:
            raise ValueError(f"{manifest.name} {manifest.version} has no reference distribution")
        self.sessions = sessions
        self.manifest = manifest
        self.reference = manifest.reference
        self.points = points
        self.window = dt.timedelta(days=window_days)
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cached: tuple[float, int, dict[str, Drift]] | None = None

    def groups(self, fresh: bool = False) -> dict[str, Drift]:
        with self._lock, self.sessions() as s:
            latest = latest_prediction(s)
            if (not fresh and self._cached is not None and self._cached[1] == latest
                    and time.monotonic() - self._cached[0] < self.max_age_s):
                return self._cached[2]
            samples = image_samples(s, since=dt.datetime.now(dt.UTC) - self.window,
                                    model_sha256=self.manifest.sha256)
            s.rollback()
            groups = watch(self.reference, samples, self.points)
            self._cached = (time.monotonic(), latest, groups)
            return groups

    def check(self) -> dict[str, Drift]:
        """Compute afresh; log a warning naming every drifted group that is judged (all images,
        each manufacturer: :func:`~dicomai.model.drift.judged`)."""
        groups = self.groups(fresh=True)
        drifted = drifted_groups(groups)
        if drifted:
            log.warning("model.drift", threshold=PSI_WARN, days=self.window.days,
                        groups={name: d.brief() for name, d in drifted.items()})
        return groups

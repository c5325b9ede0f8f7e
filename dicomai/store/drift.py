"""The node's recorded image scores and statistics, for the drift watch."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomai.imaging.stats import ImageStats
from dicomai.model.drift import Sample
from dicomai.store.models import Instance, Prediction, Series

__all__ = ["image_samples", "latest_prediction"]


def image_samples(session: Session, since: dt.datetime | None = None,
                  model_sha256: str | None = None) -> list[Sample]:
    """Every analysed image (its latest and earlier runs alike), optionally since a time and
    of one model: probability, Body Part Examined and, where recorded, its statistics."""
    q = (select(Prediction.probability, Series.body_part, Prediction.image_stats)
         .join(Instance, Instance.id == Prediction.instance_id)
         .join(Series, Series.id == Instance.series_id)
         .where(Prediction.level == "image", Prediction.probability.is_not(None))
         .order_by(Prediction.id))
    if since is not None:
        q = q.where(Prediction.created_at >= since)
    if model_sha256 is not None:
        q = q.where(Prediction.model_sha256 == model_sha256)
    samples = []
    for p, part, stats in session.execute(q).all():
        if p is None:
            continue
        try:
            parsed = ImageStats.from_dict(stats) if stats else None
        except (KeyError, TypeError, ValueError):  # a row written by hand or damaged: scores only
            parsed = None
        samples.append(Sample(float(p), part, parsed))
    return samples


def latest_prediction(session: Session) -> int:
    """The id of the newest prediction row (0 when none): unchanged, no image was analysed since."""
    return int(session.scalar(select(func.max(Prediction.id))) or 0)

"""The node's recorded image scores, for the drift watch."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.store.models import Instance, Prediction, Series

__all__ = ["image_scores"]


def image_scores(session: Session, since: dt.datetime | None = None,
                 model_sha256: str | None = None) -> list[tuple[float, str | None]]:
    """``(probability, body part)`` of every analysed image, optionally since a time and of one model."""
    q = (select(Prediction.probability, Series.body_part)
         .join(Instance, Instance.id == Prediction.instance_id)
         .join(Series, Series.id == Instance.series_id)
         .where(Prediction.level == "image", Prediction.probability.is_not(None))
         .order_by(Prediction.id))
    if since is not None:
        q = q.where(Prediction.created_at >= since)
    if model_sha256 is not None:
        q = q.where(Prediction.model_sha256 == model_sha256)
    return [(p, part) for p, part in session.execute(q).all() if p is not None]

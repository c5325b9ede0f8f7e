"""The audit database: every association, instance, study and step, queryable by admins."""

from dicomai.audit.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_sessionmaker,
    open_database,
    upgrade,
)
from dicomai.audit.models import (
    Association,
    Event,
    Instance,
    InstanceState,
    OutboxItem,
    OutboxState,
    Prediction,
    Quarantined,
    ResultObject,
    Series,
    Study,
    StudyState,
)
from dicomai.audit.records import record_event

__all__ = [
    "Association",
    "Event",
    "Instance",
    "InstanceState",
    "OutboxItem",
    "OutboxState",
    "Prediction",
    "Quarantined",
    "ResultObject",
    "Series",
    "Study",
    "StudyState",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "open_database",
    "record_event",
    "upgrade",
]

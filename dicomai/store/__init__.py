"""The audit store: ORM models, schema management, every SQL query and the durable spool."""

from dicomai.store.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_sessionmaker,
    open_database,
    upgrade,
)
from dicomai.store.events import record_event
from dicomai.store.models import (
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

"""The node's operations endpoint: its readiness checks and metrics, served over HTTP."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import structlog
from apscheduler.schedulers.base import BaseScheduler
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Settings
from dicomai.model.package import Manifest
from dicomai.ops.checks import Check, check_database, check_disk
from dicomai.ops.drift import DriftWatch
from dicomai.ops.metrics import AuditCollector
from dicomai.ops.server import OpsServer

__all__ = ["check_scheduler", "start_endpoint"]

log = structlog.get_logger("dicomai.ops")


def check_scheduler(scheduler: BaseScheduler, job_id: str, interval_s: float, now: dt.datetime) -> Check:
    """The scheduler runs and its job ``job_id`` is not overdue (a stuck or dead thread)."""
    if not scheduler.running:
        return Check("scheduler", False, "not running")
    job = scheduler.get_job(job_id)
    if job is None or job.next_run_time is None:
        return Check("scheduler", False, f"job {job_id} is not scheduled")
    late = (now - job.next_run_time).total_seconds()
    if late > max(30.0, 10 * interval_s):
        return Check("scheduler", False, f"job {job_id} overdue by {late:.0f} s")
    return Check("scheduler", True, f"job {job_id} next at {job.next_run_time.isoformat()}")


def start_endpoint(settings: Settings, engine: Engine, sessions: sessionmaker[Session],
                   manifest: Manifest | None, scheduler: BaseScheduler,
                   drift: DriftWatch | None = None) -> OpsServer | None:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` when ``http.enabled``.

    A port that cannot be bound is logged and the node runs on without the endpoint: DICOM
    reception and triage matter more than their monitoring.
    """
    cfg = settings.http
    if not cfg.enabled:
        return None
    model = (Check("model", True, f"{manifest.name} {manifest.version}") if manifest is not None
             else Check("model", False, "no model loaded (set model.path)"))

    def ready() -> Sequence[Check]:
        return [check_database(engine), model, check_disk(settings),
                check_scheduler(scheduler, "studies.poll", settings.studies.poll_interval_s,
                                dt.datetime.now(dt.UTC))]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(sessions, settings.data_dir, dt.datetime.now(dt.UTC), manifest, drift))
    try:
        server = OpsServer(cfg.host, cfg.port, ready, registry)
    except OSError as exc:
        log.error("ops.unavailable", host=cfg.host, port=cfg.port, error=str(exc))
        return None
    log.info("ops.listening", host=cfg.host, port=server.port)
    return server.start()

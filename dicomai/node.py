"""``dicomai serve``: wires the listener, the study monitor, the scheduler and the outbox together.

Start-up order: open (or create) the audit database and refuse one that is behind,
prepare the spool, refuse a database that is not the spool's and register orphan spool
files (:mod:`dicomai.store.integrity`), re-queue unfinished studies, start the scheduler and the outbox sender
(which resumes whatever was pending), then listen. On SIGTERM/SIGINT the node stops
accepting associations, lets in-flight ones finish (up to ``node.shutdown_grace_s``), then
stops the scheduler and the sender. With systemd ``Type=notify`` it
reports READY/STOPPING and feeds the watchdog from the scheduler thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicomai import __version__
from dicomai.analysis.image import Analyser, describe_thresholds
from dicomai.analysis.study import StudyAnalyser
from dicomai.config import Output, Settings, masked
from dicomai.deliver.outbox import OutboxWorker, Sender
from dicomai.errors import InUseError
from dicomai.model.classifier import Classifier
from dicomai.model.package import ModelPackage, load_package
from dicomai.net.dimse import parse_instance
from dicomai.net.listener import Receiver
from dicomai.net.tls import check_key_permissions, client_context, read_certificates, server_context
from dicomai.ops.drift import DriftWatch
from dicomai.ops.endpoint import start_endpoint
from dicomai.ops.retention import RetentionJob
from dicomai.results.publish import Publisher
from dicomai.store import make_sessionmaker, open_database, record_event
from dicomai.store import results as store_results
from dicomai.store.integrity import check_store
from dicomai.store.models import utcnow
from dicomai.store.spool import Spool
from dicomai.studies import StudyHook, StudyMonitor, StudyWork
from dicomai.web.server import start_console

__all__ = ["Triage", "build_stage", "default_model_dir", "limit_malloc_arenas", "lock_data_dir",
           "return_free_memory", "run_node", "sd_notify"]

log = structlog.get_logger("dicomai.node")


def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) datagram when run under systemd; a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) before threads start.

    Every association, the scheduler and the outbox run in threads; glibc gives each thread
    its own arena, and multi-megabyte image buffers freed in one arena are not reused by
    another. Measured with ``benchmarks/e2e.py``: peak RSS 671 MB with the default, 508 MB
    with two arenas, same latency. An admin's own ``MALLOC_ARENA_MAX`` wins.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(-8, arenas))  # M_ARENA_MAX


def _glibc(name: str) -> Any | None:
    """A glibc function by name; None off Linux or with another C library (musl, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def default_model_dir() -> Path | None:
    """The model package shipped inside dicomai, when this build has one."""
    path = Path(str(files("dicomai"))) / "models" / "default"
    return path if (path / "model.json").is_file() else None


def return_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); False where
    the C library has no such call (musl, ...).

    A study's images pass through many multi-megabyte buffers that glibc, once it has raised
    its mmap threshold past their size, serves from the heap; freed, they stay in the process
    until the heap's top is free. Measured with ``benchmarks/e2e.py``'s studies: 449 to 591
    MB resident after each study without, 358 to 387 MB with a trim after the analysis and
    after the results, and a lower peak (569 to 601 MB against 604 to 715); the stage's time
    per study stayed within its run-to-run spread (1510 and 1597 ms, against 1474 to 1523).
    """
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


class Triage:
    """The node's work on a stable study: analysis, then results (which queue the delivery)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], package: ModelPackage,
                 classifier: Classifier, on_queued: Callable[[], None] | None = None) -> None:
        analyser = Analyser.in_force(settings, package, classifier)
        self.analyse = StudyAnalyser(analyser)
        self.publish = Publisher(settings, sessions, package.manifest, analyser.points, on_queued=on_queued)

    def __call__(self, work: StudyWork) -> None:
        analysis = self.analyse(work)
        return_free_memory()  # the decoding's buffers, before the results make their own
        self.publish(analysis)
        del analysis  # the study's display images and maps
        return_free_memory()


class NotAnalysed:
    """The stage when no model is installed: every image is recorded not analysed, with why."""

    def __init__(self, sessions: sessionmaker[Session], reason: str) -> None:
        self.sessions = sessions
        self.reason = reason

    def __call__(self, work: StudyWork) -> None:
        with self.sessions.begin() as s:
            store_results.record_not_analysed(
                s, work.study_id, work.study_instance_uid, work.reopen_count,
                [(i.instance_id, i.sop_instance_uid) for i in work.instances], self.reason, utcnow())


def build_stage(settings: Settings, sessions: sessionmaker[Session],
                on_queued: Callable[[], None] | None = None) -> StudyHook:
    """The node's stage; raises ModelError (the node must not start) on a bad package."""
    path = settings.model.path or default_model_dir()
    if path is None:
        log.warning("model.missing", hint="set model.path; images are recorded as not_analysed")
        return NotAnalysed(sessions, "no model installed (set model.path)")
    package = load_package(path)
    classifier = Classifier(package, settings.model.threads, settings.model.providers)
    m = package.manifest
    log.info("model.loaded", name=m.name, version=m.version, sha256=m.sha256[:16],
             providers=classifier.providers)
    stage = Triage(settings, sessions, package, classifier, on_queued=on_queued)
    log.info("model.thresholds", detail=describe_thresholds(settings, package))
    if settings.scope.analyse_unknown_body_part:
        log.warning("scope.unrecognised_body_parts_analysed",
                    hint="scope.analyse_unknown_body_part is on: body parts the node cannot recognise are "
                         "analysed, outside the model's validated scope; prefer scope.body_part_aliases")
    if stage.publish.wants(Output.SC) or stage.publish.wants(Output.SR):
        log.info("results.ready", warm_up_s=round(stage.publish.warm_up(), 3))
    return stage


def lock_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir/.lock`` for this process's lifetime; InUseError if another node holds it.

    Two nodes on one data directory would claim the same studies and spool files. The lock
    is the kernel's (flock), so it is released however the holder ends, ``kill -9`` included.
    """
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise InUseError(f"data directory {data_dir}",
                         f" by another dicomai serve{f' (pid {holder})' if holder else ''}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _log_certificate(path: Path | None) -> None:
    """Log the node's certificate and its days left; a warning within 30 days of expiry."""
    if path is None:
        return
    try:
        cert = read_certificates(path)[0]
    except (OSError, ValueError) as exc:  # ssl loaded it: only this reader cannot
        log.warning("tls.certificate", path=str(path), error=str(exc))
        return
    days = cert.days_left(utcnow())
    level = log.warning if days < 30 else log.info
    level("tls.certificate", subject=cert.subject, not_after=cert.not_after.isoformat(),
          days_left=round(days, 1))


def run_node(settings: Settings, hook: StudyHook | None = None) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    # Keys and certificates first: a node that cannot speak TLS as configured does not start.
    check_key_permissions(settings)
    tls_context = server_context(settings.tls) if settings.tls.enabled else None
    for dest in settings.destinations:
        if dest.tls:
            client_context(dest)
    limit_malloc_arenas()
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(data_dir)
    engine = open_database(settings.database_url, echo=settings.database.echo)
    sessions = make_sessionmaker(engine)
    spool = Spool(data_dir, fsync=settings.storage.fsync,
                  min_free_bytes=settings.storage.min_free_mb * 2**20)
    removed = spool.prepare()
    check_store(spool, sessions, engine.url.render_as_string(hide_password=True), parse_instance)
    outbox = OutboxWorker(Sender(settings, sessions), settings.outbox.poll_interval_s)
    if hook is None:
        hook = build_stage(settings, sessions, on_queued=outbox.kick)
    st = settings.studies
    monitor = StudyMonitor(sessions, data_dir, st.quiet_period_s, hook,
                           settle_s=st.settle_s if st.on_release else None)
    recovered = monitor.recover()
    with sessions.begin() as s:
        record_event(s, "node", "node.started",
                     details={"version": __version__, "ae_title": settings.node.ae_title,
                              "port": settings.node.port, "recovered_studies": recovered,
                              "partial_files_removed": removed})
    log.info("node.config", config=masked(settings))

    drift = _drift_watch(settings, sessions, hook)
    scheduler = _scheduler(settings, sessions, monitor, drift)
    scheduler.start()
    outbox.start()
    receiver = Receiver(settings, spool, sessions)
    ae = receiver.build_ae()
    try:
        servers = _listen(settings, ae, receiver, tls_context)
    except BaseException:
        scheduler.shutdown(wait=False)
        outbox.stop(timeout=settings.node.shutdown_grace_s)
        raise
    manifest = hook.publish.manifest if isinstance(hook, Triage) else None
    # The operations endpoint (/healthz, /readyz, /metrics); None when off or its port is taken.
    ops = start_endpoint(settings, engine, sessions, manifest, scheduler, drift)
    # The web console (dicomai.web); None when off (the default) or its port is taken.
    web = start_console(settings, sessions, manifest,
                        hook.analyse.analyser if isinstance(hook, Triage) else None)
    # Handlers before READY: a supervisor may send SIGTERM the moment it reads READY=1.
    stop = _stop_on_signal()
    sd_notify("READY=1")
    while not stop.wait(0.5):
        pass
    sd_notify("STOPPING=1")
    # Stop accepting new associations but let running ones finish their stores.
    for server in servers:
        server.shutdown()
    deadline = time.monotonic() + settings.node.shutdown_grace_s
    while receiver.active and time.monotonic() < deadline:
        time.sleep(0.1)
    if receiver.active:
        log.warning("node.aborting_associations", active=receiver.active)
    ae.shutdown()
    receiver.close()
    scheduler.shutdown(wait=True)
    outbox.stop(timeout=settings.node.shutdown_grace_s)
    for service in (ops, web):
        if service is not None:
            service.stop()
    with sessions.begin() as s:
        record_event(s, "node", "node.stopped")
    engine.dispose()
    log.info("node.stopped")
    os.close(lock)
    return 0


def _drift_watch(settings: Settings, sessions: sessionmaker[Session], hook: StudyHook) -> DriftWatch | None:
    """The drift watch of the model in use; None without a model or a reference in its manifest."""
    if not isinstance(hook, Triage) or hook.publish.manifest.reference is None:
        return None
    return DriftWatch(sessions, hook.publish.manifest, hook.publish.points, settings.model.drift_window_days)


def _scheduler(settings: Settings, sessions: sessionmaker[Session], monitor: StudyMonitor,
               drift: DriftWatch | None = None) -> BackgroundScheduler:
    """The node's periodic jobs: the study monitor, retention, the drift watch, the systemd
    watchdog."""
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(monitor.poll, "interval", seconds=settings.studies.poll_interval_s,
                      id="studies.poll", max_instances=1, coalesce=True)
    # Retention: once at start (a node restarted on a full disk frees it first), then every interval.
    scheduler.add_job(RetentionJob(settings, sessions), "interval", minutes=settings.retention.interval_min,
                      id="retention.purge", max_instances=1, coalesce=True, next_run_time=utcnow())
    if drift is not None:
        scheduler.add_job(drift.check, "interval", minutes=settings.model.drift_check_min, id="model.drift",
                          max_instances=1, coalesce=True)
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if watchdog_usec:
        scheduler.add_job(sd_notify, "interval", seconds=max(watchdog_usec / 2e6, 1.0),
                          args=["WATCHDOG=1"], id="watchdog", max_instances=1, coalesce=True)
    return scheduler


def _listen(settings: Settings, ae: AE, receiver: Receiver, tls_context: ssl.SSLContext | None,
            ) -> list[ThreadedAssociationServer]:
    """Start the plain and/or TLS listeners; a port in use is an :class:`InUseError`."""
    ports: list[tuple[int, str, ssl.SSLContext | None]] = []
    if settings.tls.plain or not settings.tls.enabled:
        ports.append((settings.node.port, "node.port", None))
    if tls_context is not None:
        ports.append((settings.tls.port, "tls.port", tls_context))
    servers: list[ThreadedAssociationServer] = []
    for port, key, context in ports:
        try:
            server = ae.start_server((settings.node.host, port), block=False,
                                     evt_handlers=receiver.handlers(), ssl_context=context)
        except OSError as exc:
            for started in servers:
                started.shutdown()
            if exc.errno == errno.EADDRINUSE:
                raise InUseError(f"port {port} on {settings.node.host}",
                                 f" (another process listens there; set {key} or stop it)") from None
            raise
        assert server is not None  # block=False always returns the server
        servers.append(server)
    log.info("node.listening", ae_title=settings.node.ae_title, host=settings.node.host,
             port=settings.node.port if settings.tls.plain or not settings.tls.enabled else None,
             tls_port=settings.tls.port if settings.tls.enabled else None,
             data_dir=str(settings.data_dir), version=__version__)
    if settings.tls.enabled:
        _log_certificate(settings.tls.certificate)
    return servers


def _stop_on_signal() -> threading.Event:
    """An event that SIGTERM or SIGINT sets (from now on)."""
    stop = threading.Event()

    def _signal(signum: int, _frame: FrameType | None) -> None:
        log.info("node.stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    return stop

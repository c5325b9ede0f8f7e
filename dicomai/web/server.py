"""Serving the console from the node: uvicorn in one daemon thread, on its own port.

The operations endpoint stays a separate server: it answers monitoring without a login, on
an address a firewall opens to the monitoring host, and must keep answering whatever the
console does; the console answers people, with sessions, on an address a TLS proxy fronts.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import structlog
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from dicomai.analysis.image import Analyser, points_in_force
from dicomai.config import Settings
from dicomai.model.package import Manifest, ModelError, load_package
from dicomai.model.profile import profile_for
from dicomai.store.users import list_users
from dicomai.web.app import build_app
from dicomai.web.demo import Demo
from dicomai.web.security import Throttle, load_secret
from dicomai.web.state import Console, ModelInUse

__all__ = ["SECRET_FILE", "ConsoleServer", "start_console"]

log = structlog.get_logger("dicomai.web")

#: The console's secret (CSRF tokens), in the data directory, made at first start.
SECRET_FILE = "web-secret.key"


class ConsoleServer:
    """The console on a bound socket, served until :meth:`stop`."""

    def __init__(self, console: Console, sock: socket.socket) -> None:
        self.sock = sock
        config = uvicorn.Config(
            build_app(console), log_config=None,  # the node's logging stays as configured
            access_log=False,  # request lines would carry search terms (accession numbers)
            lifespan="off", proxy_headers=True, forwarded_allow_ips="127.0.0.1",
            server_header=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="web-console", daemon=True)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> ConsoleServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _model_in_use(settings: Settings, manifest: Manifest | None) -> ModelInUse | None:
    """The package the node loaded (its card and network), found again where the node found it,
    with the operating points the node read at its start."""
    if manifest is None:
        return None
    from dicomai.node import default_model_dir  # the node imports this module

    path = settings.model.path or default_model_dir()
    try:
        # The node checked the file's hash a moment ago; the manifest's must be the same.
        package = load_package(path, check_hash=False) if path is not None else None
    except ModelError as exc:
        log.warning("web.model_unavailable", error=str(exc))
        return None
    if package is None or package.manifest.sha256 != manifest.sha256:
        log.warning("web.model_unavailable", error="the package on disk is not the one the node loaded")
        return None
    return ModelInUse(package, profile_for(settings.data_dir, package), points_in_force(settings, package))


def start_console(settings: Settings, sessions: sessionmaker[Session], manifest: Manifest | None,
                  analyser: Analyser | None = None) -> ConsoleServer | None:
    """Serve the console when ``web.enabled``; a port that cannot be bound is logged and the
    node runs on without it (DICOM reception and triage matter more). ``analyser`` is the
    node's own, for the try page (none without a model)."""
    cfg = settings.web
    if not cfg.enabled:
        return None
    loaded = _model_in_use(settings, manifest)
    console = Console(settings, sessions, load_secret(settings.data_dir / SECRET_FILE),
                      f"{manifest.name} {manifest.version}" if manifest else None,
                      Throttle(cfg.max_login_failures), loaded=loaded,
                      demo=Demo(settings, analyser) if analyser is not None else None)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        log.error("web.unavailable", host=cfg.host, port=cfg.port, error=str(exc))
        return None
    sock.setblocking(False)
    with sessions() as s:
        if not list_users(s):
            log.warning("web.no_users", hint="add one: dicomai users add NAME --role admin")
    log.info("web.listening", host=cfg.host, port=cfg.port)
    return ConsoleServer(console, sock).start()

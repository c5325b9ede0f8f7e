"""The operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP.

The standard library's ``ThreadingHTTPServer`` in one daemon thread serves all three paths:
prometheus_client's own server only serves metrics, and three fixed GET routes need no web
framework. A scrape or a probe never touches the DICOM listener.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicomai.ops.checks import Check

__all__ = ["OpsServer"]

log = structlog.get_logger("dicomai.ops")


class OpsServer:
    """Serves the three paths on ``host:port`` until :meth:`stop`.

    ``ready`` returns the readiness checks; any failing one turns ``/readyz`` into 503 with
    the failing checks named first.
    """

    def __init__(self, host: str, port: int, ready: Callable[[], Sequence[Check]],
                 registry: CollectorRegistry) -> None:
        self.ready = ready
        self.registry = registry
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> OpsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def readiness(self) -> tuple[HTTPStatus, str]:
        """The status and body of ``/readyz``."""
        checks = self.ready()
        failed = [c for c in checks if not c.ok]
        ordered = [*failed, *(c for c in checks if c.ok)]
        lines = [f"{'ok' if c.ok else 'FAIL'} {c.item}: {c.detail}" for c in ordered]
        if failed:
            head = "not ready: " + ", ".join(c.item for c in failed)
            return HTTPStatus.SERVICE_UNAVAILABLE, "\n".join([head, *lines]) + "\n"
        return HTTPStatus.OK, "\n".join(["ready", *lines]) + "\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        ops = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dicomai-ops"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.partition("?")[0]
                if path == "/healthz":
                    self._reply(HTTPStatus.OK, b"ok\n")
                elif path == "/readyz":
                    status, body = ops.readiness()
                    if status != HTTPStatus.OK:
                        log.warning("ops.not_ready", body=body.splitlines()[0])
                    self._reply(status, body.encode())
                elif path == "/metrics":
                    try:
                        data = generate_latest(ops.registry)
                    except Exception as exc:  # a failing query must not kill the server thread
                        log.error("ops.metrics_failed", error=str(exc))
                        self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"metrics failed: {exc}\n".encode())
                        return
                    self._reply(HTTPStatus.OK, data, CONTENT_TYPE_LATEST)
                else:
                    self._reply(HTTPStatus.NOT_FOUND, b"not found: try /healthz, /readyz or /metrics\n")

            def _reply(self, status: HTTPStatus, body: bytes,
                       content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                # Debug only: a probe every few seconds would drown the node's log.
                log.debug("ops.request", line=format % args)

        return Handler

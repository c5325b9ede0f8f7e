"""Session tokens, CSRF tokens, the console's secret and the login throttle.

A session cookie carries a random token; the database keeps only its SHA-256
(:mod:`dicomai.store.users`). A form's CSRF token is an HMAC, under the node's secret, of
what the browser's cookie holds (the session token once logged in, a random login nonce
before), so it needs no storage and a page of another site cannot compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
from collections import deque
from pathlib import Path

import structlog

__all__ = ["Throttle", "csrf_ok", "csrf_token", "load_secret", "new_token", "token_digest"]

log = structlog.get_logger("dicomai.web")


def load_secret(path: Path) -> bytes:
    """The console's secret, made (32 random bytes, mode 0600) the first time."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("web.secret_readable", path=str(path), mode=oct(mode), hint="chmod 600")
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        log.info("web.secret_created", path=str(path))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"{path}: the console's secret is too short; delete the file to make a new one")
    return secret.encode()


def new_token() -> str:
    """A random token for a cookie (256 bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database keeps of a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(secret: bytes, bound_to: str) -> str:
    """The CSRF token of forms shown to the holder of the cookie value ``bound_to``."""
    return hmac.new(secret, b"csrf:" + bound_to.encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, bound_to: str | None, given: str | None) -> bool:
    """Whether a form's token belongs to the cookie value ``bound_to``."""
    if not bound_to or not given:
        return False
    return hmac.compare_digest(csrf_token(secret, bound_to), given)


class Throttle:
    """At most ``limit`` failures per key (user name and address) within ``window_s`` seconds.

    Kept in memory: one node serves the console, and a restart forgetting the failures of
    the last minutes costs an attacker a restart per few guesses. Thread-safe.
    """

    MAX_KEYS = 10_000  # beyond this, the keys with the oldest failures are forgotten

    def __init__(self, limit: int, window_s: float = 900.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def wait_s(self, key: tuple[str, str], now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        with self._lock:
            times = self._recent(key, now)
            if len(times) < self.limit:
                return 0.0
            return times[-self.limit] + self.window_s - now

    def fail(self, key: tuple[str, str], now: float) -> None:
        with self._lock:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            if len(self._failures) > self.MAX_KEYS:
                oldest = min(self._failures, key=lambda k: self._failures[k][-1] if self._failures[k] else 0)
                del self._failures[oldest]

    def clear(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)

"""Who may see what: the access middleware, login and logout, and CSRF-checked forms.

Nothing but ``/login`` and ``/static/`` answers without a live session: any other GET is
sent to the login page, any other method refused. Every POST handler is made with
:func:`form_handler`, which refuses (403) a form without the CSRF token of the browser's
cookie. Logins, failed logins, throttling and logouts are written to the audit log.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomai.store.events import record_event
from dicomai.store.models import utcnow
from dicomai.store.users import (
    Account,
    end_session,
    find_user,
    purge_sessions,
    session_account,
    start_session,
)
from dicomai.web.passwords import verify_password
from dicomai.web.security import csrf_ok, csrf_token, new_token, token_digest
from dicomai.web.state import Console

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "AccessMiddleware", "csrf_refused", "form_handler", "login",
           "login_page", "logout", "page_csrf"]

log = structlog.get_logger("dicomai.web")

SESSION_COOKIE = "dicomai_session"
LOGIN_COOKIE = "dicomai_login"  # a nonce the login form's CSRF token is bound to
_PUBLIC = ("/login", "/static/")
_STAGE = "web"

FormHandler = Callable[[Request, FormData], Awaitable[Response]]


def _public(path: str) -> bool:
    return path == _PUBLIC[0] or path.startswith(_PUBLIC[1])


def client_ip(conn: HTTPConnection) -> str:
    """The browser's address (a TLS proxy on loopback passes it in X-Forwarded-For)."""
    return conn.client.host if conn.client else "unknown"


class AccessMiddleware:
    """Resolves the session cookie to a user; turns away requests without one."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        token = conn.cookies.get(SESSION_COOKIE)
        account = await run_in_threadpool(self._account, token) if token else None
        state = scope.setdefault("state", {})
        state["account"], state["token"] = account, token if account else None
        if account is None and not _public(scope["path"]):
            response: Response
            if scope["method"] in ("GET", "HEAD"):
                query = scope["query_string"].decode()
                target = scope["path"] + (f"?{query}" if query else "")
                response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            else:
                response = PlainTextResponse("not logged in\n", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _account(self, token: str) -> Account | None:
        idle = dt.timedelta(minutes=self.console.settings.web.session_idle_min)
        with self.console.sessions.begin() as s:
            return session_account(s, token_digest(token), utcnow(), idle)


def page_csrf(console: Console, request: Request) -> str:
    """The CSRF token for the forms of a logged-in page."""
    token: str = request.state.token
    return csrf_token(console.secret, token)


def form_handler(console: Console, handler: FormHandler, *, login_form: bool = False) -> Callable[
        [Request], Awaitable[Response]]:
    """A POST endpoint that runs ``handler`` only for a form carrying the right CSRF token."""

    async def endpoint(request: Request) -> Response:
        form = await request.form()
        refused = csrf_refused(console, request, form, login_form=login_form)
        return refused if refused is not None else await handler(request, form)

    return endpoint


def csrf_refused(console: Console, request: Request, form: FormData, *,
                 login_form: bool = False) -> Response | None:
    """The 403 for a form without the CSRF token of the browser's cookie; ``None`` for a good one.

    For an endpoint that reads its form itself (:func:`form_handler` does it for the others).
    """
    bound = request.cookies.get(LOGIN_COOKIE) if login_form else request.state.token
    given = form.get("csrf")
    if csrf_ok(console.secret, bound, given if isinstance(given, str) else None):
        return None
    log.warning("web.csrf_refused", path=request.url.path, ip=client_ip(request))
    return PlainTextResponse("refused: the form's security token is missing or stale; "
                             "reload the page and try again\n", status_code=403)


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never another host (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_page(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if request.state.account is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        return _login_form(console, request, None, 200)

    return endpoint


def _login_form(console: Console, request: Request, error: str | None, status: int) -> Response:
    nonce = request.cookies.get(LOGIN_COOKIE) or new_token()
    response = console.templates.TemplateResponse(request, "login.html", {
        "csrf": csrf_token(console.secret, nonce), "error": error,
        "next": _safe_next(request.query_params.get("next")), "account": None}, status_code=status)
    _cookie(response, request, LOGIN_COOKIE, nonce, None)
    return response


def login(console: Console) -> FormHandler:
    cfg = console.settings.web

    async def handler(request: Request, form: FormData) -> Response:
        name = str(form.get("name") or "").strip()[:64]
        password = str(form.get("password") or "")
        ip = client_ip(request)
        key = (name.lower(), ip)
        wait = console.throttle.wait_s(key, time.monotonic())
        if wait > 0:
            await run_in_threadpool(_audit, console, "web.login_throttled", name, ip, "warning")
            return _login_form(console, request, f"Too many failed logins: try again in "
                               f"{max(1, round(wait / 60))} minute(s).", 429)
        found = await run_in_threadpool(_find, console, name)
        ok = await run_in_threadpool(verify_password, found[1] if found else None, password)
        if found is None or not ok:
            console.throttle.fail(key, time.monotonic())
            await run_in_threadpool(_audit, console, "web.login_failed", name, ip, "warning")
            log.info("web.login_failed", user=name, ip=ip)
            return _login_form(console, request, "Wrong user name or password.", 401)
        console.throttle.clear(key)
        account = found[0]
        token = new_token()
        now = utcnow()
        max_age = dt.timedelta(hours=cfg.session_max_h)

        def begin() -> None:
            with console.sessions.begin() as s:
                purge_sessions(s, now)  # a login is rare enough to tidy up ended sessions
                start_session(s, account.id, token_digest(token), now, now + max_age)
                record_event(s, _STAGE, "web.login", details={"user": account.name, "role": account.role,
                                                              "ip": ip})

        await run_in_threadpool(begin)
        log.info("web.login", user=account.name, role=str(account.role), ip=ip)
        response = RedirectResponse(_safe_next(str(form.get("next") or "")), status_code=303)
        _cookie(response, request, SESSION_COOKIE, token, int(max_age.total_seconds()))
        response.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return handler


def logout(console: Console) -> FormHandler:
    async def handler(request: Request, form: FormData) -> Response:
        account: Account = request.state.account
        token: str = request.state.token

        def end() -> None:
            with console.sessions.begin() as s:
                end_session(s, token_digest(token))
                record_event(s, _STAGE, "web.logout",
                             details={"user": account.name, "ip": client_ip(request)})

        await run_in_threadpool(end)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return handler


def _find(console: Console, name: str) -> tuple[Account, str] | None:
    with console.sessions() as s:
        return find_user(s, name) if name else None


def _audit(console: Console, event: str, name: str, ip: str, level: str, **details: Any) -> None:
    with console.sessions.begin() as s:
        record_event(s, _STAGE, event, level=level, details={"user": name, "ip": ip, **details})

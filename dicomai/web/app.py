"""The console as an ASGI application: its routes and the headers every response carries."""

from __future__ import annotations

from importlib.resources import files

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomai.web import auth, modelcard, pages, upload
from dicomai.web.state import Console

__all__ = ["build_app"]

# Scripts and styles only from the console's own files: an injected <script> does not run.
# Images may be data: URLs too: the try page sends its picture inside the page, kept nowhere.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")


class HeadersMiddleware:
    """Security headers on every response; pages with patient data are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = _CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "same-origin"
                headers["Cache-Control"] = "private, max-age=3600" if static else "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(console: Console) -> Starlette:
    """The console's application over ``console``'s database and settings."""
    form = auth.form_handler
    routes = [
        Route("/login", auth.login_page(console), methods=["GET"]),
        Route("/login", form(console, auth.login(console), login_form=True), methods=["POST"]),
        Route("/logout", form(console, auth.logout(console)), methods=["POST"]),
        Route("/", pages.dashboard_page(console), methods=["GET"]),
        Route("/dashboard/stats", pages.dashboard_stats(console), methods=["GET"]),
        Route("/studies", pages.worklist_page(console), methods=["GET"]),
        Route("/studies/{uid}", pages.study_page(console), methods=["GET"]),
        Route("/studies/{uid}/images/{instance_id:int}.png", pages.picture(console), methods=["GET"]),
        Route("/studies/{uid}/feedback", form(console, pages.feedback(console)), methods=["POST"]),
        Route("/outbox", pages.outbox_page(console), methods=["GET"]),
        Route("/outbox/{item_id:int}/retry", form(console, pages.outbox_retry(console)), methods=["POST"]),
        Route("/model", modelcard.model_page(console), methods=["GET"]),
        Route("/try", upload.try_page(console), methods=["GET"]),
        Route("/try", upload.try_upload(console), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(files("dicomai.web") / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(HeadersMiddleware),
                                                Middleware(auth.AccessMiddleware, console=console)])

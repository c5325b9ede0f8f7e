"""The console's pages: dashboard, worklist, study (and its final read), pictures, outbox
(and its retry).

Handlers are plain functions of the request; Starlette runs the synchronous ones in its
thread pool, so a slow query or picture never blocks the event loop.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from dicomai.model.grading import Grade
from dicomai.store.console import PageKey, dashboard, image_source, study_images, turnaround_seconds, worklist
from dicomai.store.events import record_event
from dicomai.store.feedback import (
    UnknownStudyError,
    graded_by,
    performance,
    record_feedback,
    reviewed_studies,
    study_reads,
)
from dicomai.store.models import FeedbackRead, OutboxState, StudyState, utcnow
from dicomai.store.outbox import retry_outbox
from dicomai.store.queries import list_outbox, study_record
from dicomai.web.auth import client_ip, page_csrf
from dicomai.web.pictures import picture_png
from dicomai.web.state import Console, account_of

__all__ = ["READS", "dashboard_page", "dashboard_stats", "feedback", "outbox_page", "outbox_retry", "picture",
           "render", "spread", "study_page", "worklist_page"]

log = structlog.get_logger("dicomai.web")

Endpoint = Callable[[Request], Response]
PAGE_SIZE = 50
NOTE_MAX = 2000  # characters of a final read's note

#: The final reads a radiologist chooses from, as the study page words them.
READS = {FeedbackRead.FRACTURE: "fracture confirmed", FeedbackRead.NO_FRACTURE: "no fracture",
         FeedbackRead.OTHER: "another finding, no fracture"}


def render(console: Console, request: Request, name: str, status: int = 200, **context: Any) -> Response:
    context.update(account=account_of(request), csrf=page_csrf(console, request), model=console.model,
                   path=request.url.path)
    return console.templates.TemplateResponse(request, name, context, status_code=status)


@dataclass(frozen=True)
class Spread:
    """The median and 95th percentile of some durations, and how many there were."""

    n: int
    median: float | None
    p95: float | None


def spread(values: list[float]) -> Spread:
    """Median and 95th percentile (linear interpolation); ``None`` for both without values."""
    if not values:
        return Spread(0, None, None)
    median, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
    return Spread(len(values), float(median), float(p95))


def _stats(console: Console) -> dict[str, Any]:
    now = dt.datetime.now().astimezone()  # "today" is the day of the people at the node
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = today - dt.timedelta(days=today.weekday())
    with console.sessions() as s:
        totals = dashboard(s, today, week)
        turnaround = turnaround_seconds(s, today)
        reviewed = reviewed_studies(s)
    other_model = 0
    if console.loaded is not None:  # as `dicomai model performance`: the model in use only
        reviewed, other_model = graded_by(reviewed, console.loaded.package.manifest.sha256)
    disk = shutil.disk_usage(console.settings.data_dir)
    return {"totals": totals, "grades": [g.value for g in Grade], "now": now,
            "turnaround": spread(turnaround), "reviewed": len(reviewed), "other_model": other_model,
            "performance": performance(reviewed),
            "disk_free_gb": disk.free / 2**30, "disk_free_pct": 100 * disk.free / disk.total}


def dashboard_page(console: Console) -> Endpoint:
    def endpoint(request: Request) -> Response:
        return render(console, request, "dashboard.html", **_stats(console))

    return endpoint


def dashboard_stats(console: Console) -> Endpoint:
    """The dashboard's figures alone: what its page fetches to refresh itself."""

    def endpoint(request: Request) -> Response:
        return render(console, request, "_stats.html", **_stats(console))

    return endpoint


def _choice(value: str | None, allowed: list[str]) -> str | None:
    return value if value in allowed else None


def _day(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _number(value: str | None) -> int:
    return int(value) if value and value.isdigit() and len(value) < 12 else 0


def worklist_page(console: Console) -> Endpoint:
    destinations = [d.name for d in console.settings.destinations]

    def endpoint(request: Request) -> Response:
        qp = request.query_params
        grade = _choice(qp.get("grade"), [g.value for g in Grade])
        state = _choice(qp.get("state"), [s.value for s in StudyState])
        destination = _choice(qp.get("dest"), destinations)
        search = (qp.get("q") or "").strip()[:64] or None
        day = _day(qp.get("date"))
        first = qp.get("first") == "1"
        start = PageKey(_number(qp.get("tier")), _number(qp.get("before")))
        # The day as the people at the node live it: local midnight to midnight.
        since = dt.datetime(day.year, day.month, day.day).astimezone() if day else None
        until = (since + dt.timedelta(days=1)) if since else None
        with console.sessions() as s:
            page = worklist(s, grade=grade, state=state, search=search, since=since, until=until,
                            destination=destination, positive_first=first, start=start, size=PAGE_SIZE)
        # The query string of this view without its page: what the page links carry on.
        filters = {k: v for k, v in (("grade", grade), ("state", state), ("dest", destination),
                                     ("q", search), ("date", day.isoformat() if day else None),
                                     ("first", "1" if first else None)) if v}
        return render(console, request, "worklist.html", page=page, grade=grade, state=state,
                      search=search or "", day=day, first=first, destination=destination,
                      destinations=destinations, filters=filters, paged=start != PageKey(0, 0),
                      grades=[g.value for g in Grade], states=[st.value for st in StudyState])

    return endpoint


def study_page(console: Console) -> Endpoint:
    def endpoint(request: Request) -> Response:
        uid = request.path_params["uid"]
        with console.sessions() as s:
            record = study_record(s, uid)
            if record is None:
                raise HTTPException(404, f"no study {uid}")
            images = study_images(s, record.study.id)
            reads = study_reads(s, record.study.id)
        kinds = {r.id: r.kind for r in record.results}
        return render(console, request, "study.html", record=record, study=record.study, images=images,
                      kinds=kinds, reads=reads, choices=READS, note_max=NOTE_MAX,
                      recorded=request.query_params.get("read") == "recorded")

    return endpoint


def feedback(console: Console) -> Callable[[Request, FormData], Awaitable[Response]]:
    """Record the logged-in radiologist's final read of a study (any role: viewers read images).

    The read and its ``feedback.recorded`` audit event, with the user's name, commit together.
    """

    async def handler(request: Request, form: FormData) -> Response:
        account = account_of(request)
        uid = request.path_params["uid"]
        try:
            read = FeedbackRead(str(form.get("read") or ""))
        except ValueError:
            raise HTTPException(400, "choose the final read: fracture, no fracture or other") from None
        note = str(form.get("note") or "").strip()[:NOTE_MAX] or None

        def act() -> Response:
            try:
                with console.sessions.begin() as s:
                    record_feedback(s, uid, read, account.name, note)
            except UnknownStudyError:
                raise HTTPException(404, f"no study {uid}") from None
            log.info("web.feedback", user=account.name, study_uid=uid, read=str(read))
            return RedirectResponse(f"/studies/{uid}?read=recorded#feedback", status_code=303)

        return await run_in_threadpool(act)

    return handler


def picture(console: Console) -> Endpoint:
    """An image of a study with its heat map, as PNG (made on request, the last few kept)."""
    results = console.settings.results

    def endpoint(request: Request) -> Response:
        uid, instance_id = request.path_params["uid"], int(request.path_params["instance_id"])
        with console.sessions() as s:
            source = image_source(s, uid, instance_id)
        if source is None:
            raise HTTPException(404, "no such image in this study")
        key = (instance_id, source.prediction_id)
        data = console.pictures.get(key)
        if data is None:
            data_dir = console.settings.data_dir
            try:
                data = picture_png(data_dir / source.spool_path,
                                   data_dir / source.gradcam_path if source.gradcam_path else None,
                                   results.opacity, results.floor)
            except FileNotFoundError:
                raise HTTPException(404, "the image is no longer kept on the node") from None
            except Exception:
                log.exception("web.picture_failed", study_uid=uid, instance_id=instance_id)
                raise
            console.pictures.put(key, data)
        return Response(data, media_type="image/png")

    return endpoint


def outbox_page(console: Console) -> Endpoint:
    def endpoint(request: Request) -> Response:
        with console.sessions() as s:
            dead = list_outbox(s, state=OutboxState.DEAD, limit=200)
            pending = list_outbox(s, state=OutboxState.PENDING, limit=200)
        retried = request.query_params.get("retried")
        return render(console, request, "outbox.html", dead=dead, pending=pending,
                      retried=retried if (retried or "").isdigit() else None)

    return endpoint


def outbox_retry(console: Console) -> Callable[[Request, FormData], Awaitable[Response]]:
    """Queue one outbox row again (admins only; a viewer's attempt is refused and audited)."""

    async def handler(request: Request, form: FormData) -> Response:
        account = account_of(request)
        item_id = int(request.path_params["item_id"])
        details = {"user": account.name, "ip": client_ip(request), "item": item_id}

        def act() -> Response:
            if not account.is_admin:
                with console.sessions.begin() as s:
                    record_event(s, "web", "web.denied", level="warning",
                                 details={**details, "action": "outbox.retry"})
                log.warning("web.denied", user=account.name, action="outbox.retry", item=item_id)
                raise HTTPException(403, "only an admin may retry a delivery")
            now = utcnow()
            result = retry_outbox(console.sessions, [item_id], now,
                                  now + dt.timedelta(hours=console.settings.outbox.max_age_h))
            if result.missing:
                raise HTTPException(404, f"no outbox row {item_id}")
            with console.sessions.begin() as s:
                record_event(s, "web", "web.outbox_retry", details=details)
            log.info("web.outbox_retry", user=account.name, item=item_id)
            return RedirectResponse(f"/outbox?retried={item_id}", status_code=303)

        return await run_in_threadpool(act)

    return handler

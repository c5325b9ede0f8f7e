"""Server-side render time of the web console's pages with 100 000 studies in the database.

    python benchmarks/console.py [--studies N] [--repeat N] [--postgres URL | --no-postgres]

Fills a fresh audit database (SQLite in a temporary folder, and a new database on the
PostgreSQL server of ``--postgres``, dropped afterwards) with synthetic studies through
SQLAlchemy Core bulk inserts: per study one series, one image and its prediction, an SR and
an SC with an outbox row each (a few pending or dead), three events; 2% of the studies with a
final read; arrivals spread over 100 days, the newest today. Then renders each page through
Starlette's TestClient with a logged-in session (the console's whole stack: access
middleware, session lookup, queries, templates) and prints a table of the median and p95
in ms per page and database. Goal: every page under 200 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from starlette.testclient import TestClient

from dicomai.config import Destination, NodeConfig, Settings
from dicomai.store.db import make_engine, make_sessionmaker, upgrade
from dicomai.store.models import (
    Event,
    Feedback,
    Instance,
    OutboxItem,
    Prediction,
    ResultObject,
    Series,
    Study,
    UserRole,
    utcnow,
)
from dicomai.store.users import add_user, start_session
from dicomai.web.app import build_app
from dicomai.web.auth import SESSION_COOKIE
from dicomai.web.security import Throttle, new_token, token_digest
from dicomai.web.state import Console

GOAL_MS = 200.0
BATCH = 5_000
GRADES = ["negative"] * 60 + ["doubtful"] * 15 + ["positive"] * 10 + ["not_analysed"] * 12 + ["failed"] * 3


def _rows(first: int, count: int, total: int, now: dt.datetime, days: float, rng: random.Random
          ) -> dict[str, list[dict[str, Any]]]:
    """Rows of studies ``first`` .. ``first + count - 1`` of ``total`` (ids are the study numbers)."""
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in
                                            ("studies", "series", "instances", "predictions", "results",
                                             "outbox", "events", "feedback")}
    span = days * 86400.0
    for n in range(first, first + count):
        # Ids grow with arrival time, as the node assigns them; the last study arrives now.
        received = now - dt.timedelta(seconds=span * (1 - n / total) + 30)
        grade = rng.choice(GRADES)
        analysed = grade in ("negative", "doubtful", "positive")
        p = rng.random() if analysed else None
        last = received + dt.timedelta(seconds=rng.uniform(0, 20))
        processed = last + dt.timedelta(seconds=rng.uniform(1, 8))
        uid = f"1.2.826.0.1.3680043.10.543.{n}"
        out["studies"].append(dict(
            id=n, study_instance_uid=uid, patient_id=f"PID{n % 40000}",
            patient_name=f"Doe^Patient{n % 40000}", accession_number=f"ACC{n}",
            study_date=received.strftime("%Y%m%d"),
            study_description="XR WRIST 2 VIEWS", state="processed", first_received_at=received,
            last_received_at=last, state_changed_at=processed, processed_at=processed, reopen_count=0,
            grade=grade, probability=p))
        out["series"].append(dict(id=n, study_id=n, series_instance_uid=f"{uid}.1", modality="CR",
                                  body_part="WRIST", series_number=1))
        out["instances"].append(dict(
            id=n, study_id=n, series_id=n, sop_instance_uid=f"{uid}.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1", version=1,
            size_bytes=7_000_000, sha256="0" * 64,
            spool_path=f"spool/{n}.dcm", state="stored", received_at=last))
        out["predictions"].append(dict(
            id=n, study_id=n, instance_id=n, sop_instance_uid=f"{uid}.1.1", level="image", run=1,
            model_name="bench", model_version="1", probability=p, grade=grade, created_at=processed,
            reason=None if analysed else "outside the model's validated scope"))
        for k, (kind, dest) in enumerate((("sr", "pacs"), ("sc", "pacs" if n % 50 else "archive"))):
            rid = 2 * n + k
            made = processed - dt.timedelta(seconds=0.5 - 0.2 * k)
            out["results"].append(dict(
                id=rid, study_id=n, kind=kind, run=1, sop_instance_uid=f"2.25.{rid}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", series_instance_uid=f"2.25.9{n}",
                source_instance_id=n if kind == "sc" else None, grade=grade, shadow=False, created_at=made))
            state = "dead" if n % 997 == 0 else "pending" if n > total - 20 else "sent"
            out["outbox"].append(dict(
                id=rid, result_id=rid, destination=dest, state=state, attempts=1, created_at=made,
                next_attempt_at=made, expires_at=made + dt.timedelta(days=1), last_attempt_at=made,
                sent_at=made if state == "sent" else None,
                last_error="cannot associate" if state == "dead" else None))
        for event, at in (("study.created", received), ("study.classified", processed),
                          ("study.processed", processed)):
            out["events"].append(dict(at=at, stage="studies", event=event, level="info",
                                      study_instance_uid=uid))
        if n % 50 == 0 and analysed:
            out["feedback"].append(dict(study_id=n, read=rng.choice(["fracture", "no_fracture", "other"]),
                                        read_by="bench", recorded_at=processed))
    return out


_TABLES = {"studies": Study, "series": Series, "instances": Instance, "predictions": Prediction,
           "results": ResultObject, "outbox": OutboxItem, "events": Event, "feedback": Feedback}


def fill(engine: Engine, studies: int) -> float:
    """Insert ``studies`` synthetic studies; returns the seconds it took."""
    rng = random.Random(7)
    now = utcnow()
    started = time.perf_counter()
    for first in range(1, studies + 1, BATCH):
        rows = _rows(first, min(BATCH, studies + 1 - first), studies, now, 100.0, rng)
        with engine.begin() as conn:
            for name, model in _TABLES.items():
                if rows[name]:
                    conn.execute(sa.insert(model.__table__), rows[name])  # type: ignore[arg-type]
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:  # explicit ids: move the sequences past them, then plan on fresh stats
            for name in _TABLES:
                conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                     f"(SELECT max(id) FROM {name}))"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
    return time.perf_counter() - started


def pages(studies: int) -> dict[str, str]:
    """The pages timed: path by name."""
    mid = studies // 2
    uid = f"1.2.826.0.1.3680043.10.543.{mid}"
    day = (dt.datetime.now().astimezone() - dt.timedelta(days=50)).date().isoformat()
    return {
        "dashboard": "/",
        "dashboard figures (refresh)": "/dashboard/stats",
        "worklist, first page": "/studies",
        "worklist, deep page (the middle study)": f"/studies?before={mid}",
        "worklist, positive first": "/studies?first=1",
        "worklist, positive first, deep": f"/studies?first=1&tier=2&before={mid}",
        "worklist, one day": f"/studies?date={day}",
        "worklist, grade positive": "/studies?grade=positive",
        "worklist, rare destination (2%)": "/studies?dest=archive",
        "search by accession number": f"/studies?q=ACC{mid}",
        "study page": f"/studies/{uid}",
        "outbox": "/outbox",
    }


def time_pages(engine: Engine, data_dir: Path, studies: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Median and p95 ms of each page, rendered ``repeat`` times after one warm-up."""
    sessions = make_sessionmaker(engine)
    settings = Settings(node=NodeConfig(data_dir=data_dir),
                        destinations=[Destination(name=n, ae_title=n.upper(), host="127.0.0.1", port=104)
                                      for n in ("pacs", "archive")])
    token = new_token()
    now = utcnow()
    with sessions.begin() as s:
        account = add_user(s, "bench", UserRole.ADMIN, "not a hash", now)
        assert account is not None
        start_session(s, account.id, token_digest(token), now, now + dt.timedelta(hours=2))
    console = Console(settings, sessions, b"b" * 64, "bench 1", Throttle(5))
    client = TestClient(build_app(console), follow_redirects=False)
    client.cookies.set(SESSION_COOKIE, token)
    out: dict[str, tuple[float, float]] = {}
    for name, path in pages(studies).items():
        r = client.get(path)
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            client.get(path)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        out[name] = (statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))])
    return out


@contextmanager
def fresh_postgres(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url`` (dropped afterwards)."""
    url = make_url(server_url)
    name = f"dicomai_console_bench_{int(time.time())}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(url: str, data_dir: Path, studies: int, repeat: int) -> tuple[float, dict[str, tuple[float, float]]]:
    engine = make_engine(url)
    try:
        upgrade(engine)
        filled = fill(engine, studies)
        return filled, time_pages(engine, data_dir, studies, repeat)
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=20, help="renders of each page (after one warm-up)")
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="a database on the server to create the benchmark's own database from")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    results: dict[str, tuple[float, dict[str, tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        sqlite_url = f"sqlite:///{data_dir / 'audit.sqlite3'}"
        results["SQLite"] = run(sqlite_url, data_dir, args.studies, args.repeat)
        print(f"SQLite: filled in {results['SQLite'][0]:.0f} s", file=sys.stderr)
        if not args.no_postgres:
            with fresh_postgres(args.postgres) as url:
                results["PostgreSQL"] = run(url, data_dir, args.studies, args.repeat)
            print(f"PostgreSQL: filled in {results['PostgreSQL'][0]:.0f} s", file=sys.stderr)
    names = list(next(iter(results.values()))[1])
    print(f"\nconsole pages, {args.studies} studies, server-side render through TestClient, "
          f"{args.repeat} renders each (ms, median / p95); goal < {GOAL_MS:.0f} ms\n")
    print("| page | " + " | ".join(results) + " | goal met |")
    print("|---|" + "---|" * len(results) + "---|")
    for name in names:
        cells = [f"{t[1][name][0]:.1f} / {t[1][name][1]:.1f}" for t in results.values()]
        met = all(t[1][name][1] < GOAL_MS for t in results.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()

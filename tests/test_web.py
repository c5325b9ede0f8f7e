"""The web console: its pure parts, ``dicomai users``, and the console in a real browser.

The browser tests drive Debian's Chromium through Playwright against one node (module
scope) that received a study from dcmtk's storescu and has a destination on a closed port,
so its deliveries die. Screenshots are kept in the module's temporary directory.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from starlette.testclient import TestClient

from dicomai.analysis.image import Analyser, points_in_force
from dicomai.config import Destination, NodeConfig, ScopeConfig, Settings
from dicomai.model import classifier as classifier_module
from dicomai.model.classifier import Classifier
from dicomai.model.package import OperatingPoints, load_package
from dicomai.model.profile import BodyPartPoints, SiteProfile
from dicomai.node import default_model_dir
from dicomai.store.console import worklist
from dicomai.store.db import make_engine, make_sessionmaker, upgrade
from dicomai.store.feedback import record_feedback
from dicomai.store.models import (
    Event,
    Feedback,
    FeedbackRead,
    Instance,
    OutboxItem,
    Prediction,
    ResultObject,
    Study,
    UserRole,
    utcnow,
)
from dicomai.store.users import add_user, start_session
from dicomai.web.app import build_app
from dicomai.web.auth import SESSION_COOKIE
from dicomai.web.demo import Demo
from dicomai.web.modelcard import CARD_NAME
from dicomai.web.pages import Spread, spread
from dicomai.web.passwords import hash_password, verify_password
from dicomai.web.pictures import overlay_picture
from dicomai.web.security import Throttle, csrf_ok, csrf_token, load_secret, new_token, token_digest
from dicomai.web.state import Console, ModelInUse
from tests.helpers import Node, free_port, make_study, missing, pydicom_data, storescu
from tests.test_delivery import _wait

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ADMIN = ("alice", "alice-password-1")
VIEWER = ("bob", "bob-password-22")
THROTTLED = ("carol", "carol-password-3")


# -- pure parts ----------------------------------------------------------------------------------

def test_overlay_picture_shrinks_and_draws_the_hotspot_red() -> None:
    """A 2000 x 1000 image comes out 1024 wide; the map's peak is red, cold regions stay grey."""
    image = np.full((1000, 2000), 0.5, dtype=np.float32)
    cam = np.zeros((50, 100), dtype=np.float32)
    cam[20:30, 40:60] = 1.0
    rgb = overlay_picture(image, cam)
    assert rgb.shape == (512, 1024, 3)
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    assert ((r - g > 80) & (r - b > 80)).sum() > 100  # the hotspot
    assert tuple(rgb[0, 0]) == (128, 128, 128)  # below the floor: untouched grey
    assert overlay_picture(image, None).shape == (512, 1024, 3)
    with pytest.raises(ValueError, match="2-D"):
        overlay_picture(image, np.zeros((2, 2, 2), dtype=np.float32))


def test_throttle_blocks_after_the_limit_until_the_window_passes() -> None:
    """Three failures within the window block that key only, until the oldest is window-old."""
    t = Throttle(limit=3, window_s=100)
    key = ("alice", "10.0.0.1")
    for now in (0, 10, 20):
        assert t.wait_s(key, now) == 0
        t.fail(key, now)
    assert t.wait_s(key, 30) == pytest.approx(70)
    assert t.wait_s(("alice", "10.0.0.2"), 30) == 0
    assert t.wait_s(key, 100) == 0  # the failure at 0 is forgotten
    t.clear(key)
    assert t.wait_s(key, 30) == 0


def test_csrf_tokens_are_bound_to_the_cookie_and_the_secret() -> None:
    """A token checks for its cookie value only, and not without one."""
    token = csrf_token(b"s" * 32, "cookie-1")
    assert csrf_ok(b"s" * 32, "cookie-1", token)
    assert not csrf_ok(b"s" * 32, "cookie-2", token)
    assert not csrf_ok(b"t" * 32, "cookie-1", token)
    assert not csrf_ok(b"s" * 32, None, token)
    assert not csrf_ok(b"s" * 32, "cookie-1", None)


def test_secret_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    """The console's secret file is created 0600 and read back unchanged the next time."""
    path = tmp_path / "web-secret.key"
    first = load_secret(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_secret(path) == first and len(first) == 64


def test_passwords_are_argon2_and_short_ones_refused() -> None:
    """Hashes are argon2id; the right password verifies, a wrong one or no user does not."""
    h = hash_password("long enough pw")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "long enough pw")
    assert not verify_password(h, "long enough pX")
    assert not verify_password(None, "long enough pw")
    with pytest.raises(ValueError, match="at least"):
        hash_password("short")


def _users(node: Node, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomai", "users", *args], env=node.env(),
                          input=None if password is None else password + "\n",
                          capture_output=True, text=True, timeout=60)


def test_users_commands_add_list_remove(tmp_path: Path) -> None:
    """`users add` reads stdin, refuses a taken name (1) and a short password (2); list shows no
    hash; remove ends; each change is in the audit log."""
    node = Node(data_dir=tmp_path / "data")
    node.cli("db", "upgrade")
    assert _users(node, "add", "ann", "--role", "admin", password="ann-password-1").returncode == 0
    assert _users(node, "add", "ann", "--role", "viewer", password="ann-password-2").returncode == 1
    short = _users(node, "add", "ben", "--role", "viewer", password="short")
    assert short.returncode == 2 and "at least" in short.stderr
    listed = json.loads(_users(node, "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in listed] == [("ann", "admin")]
    assert "argon2" not in json.dumps(listed)
    assert _users(node, "remove", "ann").returncode == 0
    assert _users(node, "remove", "ann").returncode == 1
    assert json.loads(_users(node, "list", "--json").stdout) == []
    events = [e for e, _ in _events(node, "user.%")]
    assert events == ["user.added", "user.removed"]


# -- in process, over HTTP -----------------------------------------------------------------------

SECRET = b"s" * 64


@dataclass
class InProcess:
    """The console's application over a fresh database, with an admin and a viewer logged in."""

    console: Console
    tokens: dict[str, str]  # user name -> session token
    data_dir: Path

    def client(self, user: str | None = "bob") -> TestClient:
        client = TestClient(build_app(self.console), follow_redirects=False)
        if user is not None:
            client.cookies.set(SESSION_COOKIE, self.tokens[user])
        return client

    def csrf(self, user: str = "bob") -> str:
        return csrf_token(SECRET, self.tokens[user])

    def study(self, n: int, grade: str | None, received: dt.datetime, *, state: str = "processed",
              processed_after_s: float | None = None, result_after_s: float | None = None,
              destination: str | None = None, probability: float | None = None,
              model_sha256: str | None = None) -> Study:
        """Add a study (one image, received at ``received``) with what the node would have made;
        a graded one graded by the console's model unless ``model_sha256`` names another."""
        with self.console.sessions.begin() as s:
            st = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.543.{n}", patient_name=f"Doe^P{n}",
                       patient_id=f"PID{n}", accession_number=f"ACC{n}", state=state,
                       first_received_at=received, last_received_at=received, state_changed_at=received,
                       processed_at=(received + dt.timedelta(seconds=processed_after_s)
                                     if processed_after_s is not None else None),
                       grade=grade, probability=probability)
            s.add(st)
            s.flush()
            if grade is not None and self.console.loaded is not None:
                s.add(Prediction(study_id=st.id, level="study", run=1, grade=grade, probability=probability,
                                 model_sha256=model_sha256 or self.console.loaded.package.manifest.sha256,
                                 created_at=received))
            if result_after_s is not None or destination is not None:
                at = received + dt.timedelta(seconds=result_after_s or 0)
                result = ResultObject(study_id=st.id, kind="sr", run=1, sop_instance_uid=f"2.25.{n}",
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                                      series_instance_uid=f"2.25.9{n}", shadow=False, created_at=at)
                s.add(result)
                s.flush()
                if destination is not None:
                    s.add(OutboxItem(result_id=result.id, destination=destination, state="sent", attempts=1,
                                     created_at=at, next_attempt_at=at, expires_at=at))
            return st

    def count(self, *tables: type[Any]) -> dict[str, int]:
        with self.console.sessions() as s:
            return {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0 for t in tables}


def _shipped_model(settings: Settings) -> ModelInUse:
    path = default_model_dir()
    if path is None:
        pytest.skip("this build ships no model")
    package = load_package(path, check_hash=False)
    return ModelInUse(package, None, points_in_force(settings, package))


@pytest.fixture
def app(tmp_path: Path) -> InProcess:
    """The console in process over SQLite, with the shipped model, users alice (admin) and bob."""
    destinations = [Destination(name=name, ae_title=name.upper(), host="127.0.0.1", port=104)
                    for name in ("pacs", "archive")]
    # The test radiograph's body part; the shipped model's own list may leave it out.
    settings = Settings(node=NodeConfig(data_dir=tmp_path / "data"), destinations=destinations,
                        scope=ScopeConfig(body_parts=["EXTREMITY"]))
    settings.data_dir.mkdir()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    tokens: dict[str, str] = {}
    now = utcnow()
    with sessions.begin() as s:
        for name, role in (("alice", UserRole.ADMIN), ("bob", UserRole.VIEWER)):
            account = add_user(s, name, role, "not a hash", now)
            assert account is not None
            tokens[name] = new_token()
            start_session(s, account.id, token_digest(tokens[name]), now, now + dt.timedelta(hours=1))
    loaded = _shipped_model(settings)
    classifier = Classifier(loaded.package, settings.model.threads, settings.model.providers)
    analyser = Analyser.in_force(settings, loaded.package, classifier)  # as dicomai.node.Triage
    console = Console(settings, sessions, SECRET, "test model 1", Throttle(5), loaded=loaded,
                      demo=Demo(settings, analyser))
    return InProcess(console, tokens, settings.data_dir)


def test_spread_is_median_and_p95() -> None:
    """Median and 95th percentile interpolate linearly; no values give none."""
    assert spread([]) == Spread(0, None, None)
    got = spread([10, 20, 30, 40, 1000])
    assert (got.n, got.median, got.p95) == (5, 30, pytest.approx(808))


def test_feedback_is_recorded_from_the_study_page_and_counts_on_the_dashboard(app: InProcess) -> None:
    """A viewer's final read (CSRF-checked) is stored with the note and audited by name; the study
    page shows it; the dashboard's PPV and NPV count it with the reads made by the CLI's store."""
    day = utcnow() - dt.timedelta(hours=1)
    uids = [app.study(n, grade, day).study_instance_uid
            for n, grade in enumerate(["positive", "positive", "positive", "negative", "negative"])]
    # graded by the model before an upgrade: its grade says nothing of the model in use
    before = app.study(9, "positive", day, model_sha256="0" * 64).study_instance_uid
    with app.console.sessions.begin() as s:  # what `dicomai feedback` stores
        for uid, read in zip(uids[1:] + [before], ["fracture", "no_fracture", "no_fracture", "fracture",
                                                   "no_fracture"], strict=True):
            record_feedback(s, uid, FeedbackRead(read), "cli-user")
    client = app.client("bob")
    page = client.get(f"/studies/{uids[0]}")
    assert page.status_code == 200 and 'name="read" value="fracture"' in page.text
    assert "No final read recorded yet." in page.text

    form = {"read": "fracture", "note": "distal radius"}
    assert client.post(f"/studies/{uids[0]}/feedback", data=form).status_code == 403
    assert app.count(Feedback)["feedback"] == 5
    assert client.post(f"/studies/{uids[0]}/feedback", data={**form, "read": "maybe",
                                                             "csrf": app.csrf()}).status_code == 400
    assert client.post("/studies/1.2.3/feedback", data={**form, "csrf": app.csrf()}).status_code == 404
    done = client.post(f"/studies/{uids[0]}/feedback", data={**form, "csrf": app.csrf()})
    assert done.status_code == 303
    assert done.headers["location"] == f"/studies/{uids[0]}?read=recorded#feedback"

    with app.console.sessions() as s:
        row = s.scalars(select(Feedback).order_by(Feedback.id.desc())).first()
        assert row is not None and (row.read, row.read_by, row.note) == ("fracture", "bob", "distal radius")
        audit = s.scalars(select(Event).where(Event.event == "feedback.recorded",
                                              Event.study_instance_uid == uids[0])).one()
        assert audit.details is not None and audit.details["by"] == "bob"
    shown = client.get(done.headers["location"]).text
    assert "Your read is recorded." in shown and "fracture confirmed" in shown and "distal radius" in shown

    # Positive: 2 fractures, 1 not -> PPV 2/3; negative: 1 without, 1 with -> NPV 1/2.
    stats = client.get("/dashboard/stats").text
    row_html = stats.split('id="performance-high_specificity"')[1].split("</tr>")[0]
    assert "0.667" in row_html and "2/3" in row_html and "0.500" in row_html and "1/2" in row_html
    assert "(5 studies;" in stats and "1 graded by another model left out" in stats


def test_dashboard_shows_turnaround_of_today_and_disk_free(app: InProcess) -> None:
    """Median and p95 from the last instance to the first result (or to processing, without one)
    of the studies processed today; yesterday's do not count; the data directory's free space."""
    now = utcnow()
    for n, span in enumerate([10, 20, 30, 1000]):
        app.study(n, "negative", now - dt.timedelta(seconds=span + 5), processed_after_s=span + 1,
                  result_after_s=span)
    app.study(10, "not_analysed", now - dt.timedelta(seconds=60), processed_after_s=40)  # no result
    app.study(11, "negative", now - dt.timedelta(days=3), processed_after_s=9999, result_after_s=9999)
    stats = app.client().get("/dashboard/stats").text
    # 10, 20, 30, 40, 1000 s: median 30 s, p95 808 s.
    assert '<strong id="turnaround-median">30.0 s</strong>' in stats
    assert '<strong id="turnaround-p95">13.5 min</strong> (5 studies)' in stats
    free = shutil.disk_usage(app.data_dir).free / 2**30
    shown = float(stats.split('id="disk-free"')[1].split(">")[1].split(" GB")[0])
    assert shown == pytest.approx(free, abs=0.2)


def test_worklist_filters_by_day_and_destination_and_puts_positives_first(app: InProcess) -> None:
    """A day keeps that local day's arrivals; a destination, the studies queued for it; positive
    first lists positive, then doubtful, then the rest, each newest first, across pages."""
    today = dt.datetime.now().astimezone().replace(hour=12, minute=0, second=0, microsecond=0)
    grades = ["positive", "negative", "doubtful", None, "positive", "failed", "doubtful", "negative"]
    for n, grade in enumerate(grades):
        app.study(n, grade, today - dt.timedelta(days=n % 2), destination="pacs" if n % 3 == 0 else None)
    order = ["ACC4", "ACC0", "ACC6", "ACC2", "ACC7", "ACC5", "ACC3", "ACC1"]
    with app.console.sessions() as s:
        seen: list[str] = []
        start = None
        while True:
            page = worklist(s, positive_first=True, start=start, size=3)
            seen += [st.accession_number or "" for st in page.studies]
            if page.older is None:
                break
            start = page.older
        assert seen == order
        assert [st.accession_number for st in worklist(s, positive_first=True, grade="negative").studies] == [
            "ACC7", "ACC1"]

    def rows(query: str) -> list[str]:
        html = app.client().get(f"/studies?{query}").text
        return re.findall(r"<td>(ACC\d+)</td>", html)

    assert rows("first=1") == order
    assert rows(f"date={today.date().isoformat()}") == ["ACC6", "ACC4", "ACC2", "ACC0"]
    assert rows("dest=pacs") == ["ACC6", "ACC3", "ACC0"]
    assert rows("dest=archive") == []
    assert len(rows("dest=nowhere&date=yesterday")) == 8  # unknown values are ignored
    html = app.client().get("/studies?first=1&date=" + today.date().isoformat()).text
    assert 'name="first" value="1" checked' in html and 'value="pacs"' in html


def test_model_page_shows_card_points_and_figures(app: InProcess) -> None:
    """The shipped card is rendered (headings, tables), with the thresholds in force and the
    manifest's test figures."""
    loaded = app.console.loaded
    assert loaded is not None
    html = app.client().get("/model").text
    m = loaded.package.manifest
    assert f"<h1>Model card: {m.name} {m.version}</h1>" in html
    assert '<article class="card">' in html and "<table>" in html.split('<article class="card">')[1]
    points = html.split('class="points"')[1].split("</table>")[0]
    assert f"{m.operating_points.high_sensitivity:.3f}" in points and "model manifest" in points
    assert f"{m.operating_points.high_specificity:.3f}" in points
    figures = html.split('class="figures"')[1].split("</table>")[0]
    assert "AUROC" in figures and "95% CI" in figures


def test_model_card_markdown_is_rendered_without_html_or_script_links(app: InProcess, tmp_path: Path) -> None:
    """Raw HTML in a card is shown as text and a javascript: link is not made a link; a site
    profile's per-body-part points are listed with their source."""
    loaded = app.console.loaded
    assert loaded is not None
    card_dir = tmp_path / "pkg"
    card_dir.mkdir()
    (card_dir / CARD_NAME).write_text("# Card\n\n<script>alert(1)</script>\n\n"
                                      "[click](javascript:alert(1))\n\n<img src=x onerror=alert(1)>\n")
    m = loaded.package.manifest
    hand = OperatingPoints(high_sensitivity=0.2, high_specificity=0.7)
    profile = SiteProfile(model_name=m.name, model_version=m.version, model_sha256=m.sha256,
                          created_at=utcnow(), by="carol", cases=300, positives=60, targets={},
                          operating_points=OperatingPoints(high_sensitivity=0.1, high_specificity=0.6),
                          body_parts={"HAND": BodyPartPoints(operating_points=hand, cases=120, positives=30)})
    app.console.loaded = ModelInUse(loaded.package.model_copy(update={"directory": card_dir}), profile,
                                    profile.points)
    html = app.client().get("/model").text
    card = html.split('<article class="card">')[1].split("</article>")[0]
    assert "<script>" not in card and "&lt;script&gt;alert(1)&lt;/script&gt;" in card
    assert "javascript:" not in card.replace("[click](javascript:alert(1))", "")
    assert "<img" not in card
    points = html.split('class="points"')[1].split("</table>")[0]
    assert re.search(r"<td>HAND</td><td>0\.200</td>\s*<td>0\.700</td><td>site profile \(300 cases", points)
    assert re.search(r"<td>other body parts</td><td>0\.100</td>\s*<td>0\.600</td>", points)


def _png_radiograph() -> bytes:
    """A test radiograph as the 8-bit PNG a clinician would export."""
    from pydicom import dcmread

    from dicomai.imaging.pixels import to_display

    display = to_display(dcmread(pydicom_data("RG3_UNCR.dcm"))).image
    buf = io.BytesIO()
    Image.fromarray((display * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_try_page_grades_an_upload_in_memory_and_keeps_nothing(app: InProcess,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOM and a PNG upload each get a grade, a probability and the overlay inside the page;
    no row is written, no file made in the data directory, the upload never spills to a
    temporary file; the page says it is a demonstration."""
    def no_spill(self: Any) -> None:
        raise AssertionError("the upload was rolled over to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_spill)
    tables = (Study, Instance, Prediction, ResultObject, OutboxItem, Event, Feedback)
    before_rows, before_files = app.count(*tables), sorted(p.name for p in app.data_dir.rglob("*"))
    client = app.client("bob")
    page = client.get("/try")
    assert page.status_code == 200 and "Demonstration only, not for diagnosis." in page.text
    dicom = pydicom_data("RG3_UNCR.dcm").read_bytes()
    assert len(dicom) > 2**20  # past Starlette's in-memory spool
    for name, data in (("x.dcm", dicom), ("x.png", _png_radiograph())):
        answer = client.post("/try", data={"csrf": app.csrf()}, files={"file": (name, data)})
        assert answer.status_code == 200, answer.text
        grade = re.search(r'id="try-grade">(\w+)<', answer.text)
        assert grade is not None and grade.group(1) in ("positive", "doubtful", "negative")
        assert re.search(r'id="try-probability">0\.\d{3}<', answer.text)
        assert 'src="data:image/png;base64,' in answer.text
    assert app.count(*tables) == before_rows
    assert sorted(p.name for p in app.data_dir.rglob("*")) == before_files


def test_try_page_grades_with_the_nodes_analyser_and_loads_no_network(
        app: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The try page runs the node's own analyser: no second onnxruntime session (another copy
    of the network in the node's memory), and the same grade and probability as the node's."""
    def no_second_network(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the try page loaded a network of its own")

    monkeypatch.setattr(classifier_module.Classifier, "__init__", no_second_network)
    assert app.console.demo is not None
    dicom = pydicom_data("RG3_UNCR.dcm")
    node_view = app.console.demo.analyser.analyse([Analyser.read(dicom)])[0]
    answer = app.client("bob").post("/try", data={"csrf": app.csrf()},
                                    files={"file": ("x.dcm", dicom.read_bytes())})
    assert answer.status_code == 200, answer.text
    assert node_view.probability is not None
    assert f'id="try-probability">{node_view.probability:.3f}<' in answer.text
    assert f'id="try-grade">{node_view.grade.value}<' in answer.text


def test_try_page_without_a_model_says_so_and_analyses_nothing(app: InProcess) -> None:
    """A node without a model (its stage records every image not analysed) has no analyser to
    lend the console: the try page offers no upload form and answers an upload with 503."""
    import dataclasses

    bare = InProcess(dataclasses.replace(app.console, demo=None), app.tokens, app.data_dir)
    client = bare.client("bob")
    page = client.get("/try")
    assert page.status_code == 200 and "No model is loaded on this node." in page.text
    assert 'action="/try"' not in page.text
    answer = client.post("/try", data={"csrf": bare.csrf()}, files={"file": ("x.png", _png_radiograph())})
    assert answer.status_code == 503 and "No model is loaded on this node." in answer.text


def test_try_page_refuses_bad_large_and_unsigned_uploads(app: InProcess) -> None:
    """No CSRF token: 403; not an image, a broken PNG: 400 with the reason; over the limit: 413
    (by Content-Length, and while reading a body that does not announce its length)."""
    client = app.client("bob")
    assert client.post("/try", files={"file": ("x.png", _png_radiograph())}).status_code == 403
    text = client.post("/try", data={"csrf": app.csrf()}, files={"file": ("x.txt", b"hello" * 100)})
    assert text.status_code == 400 and "not a DICOM (Part 10), PNG or JPEG file" in text.text
    broken = client.post("/try", data={"csrf": app.csrf()},
                         files={"file": ("x.png", _png_radiograph()[:2000])})
    assert broken.status_code == 400 and "cannot read the image" in broken.text
    none = client.post("/try", data={"csrf": app.csrf()}, files={"file": ("", b"")})
    assert none.status_code == 400 and "Choose a file" in none.text

    assert app.console.demo is not None
    app.console.demo.max_bytes = 200_000
    big = client.post("/try", data={"csrf": app.csrf()},
                      files={"file": ("x.png", b"\x89PNG" + b"0" * 400_000)})
    assert big.status_code == 413 and "larger than 195 KB, the most the try page takes" in big.text

    def chunks() -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(100):
            yield b"0" * 10_000
        yield b"\r\n--b--\r\n"

    streamed = client.post("/try", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413


# -- in a browser ----------------------------------------------------------------------------------

def _events(node: Node, like: str) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(node.data_dir / "audit.sqlite3") as db:
        rows = db.execute("SELECT event, details FROM events WHERE event LIKE ? ORDER BY id",
                          (like,)).fetchall()
    return [(event, json.loads(details) if details else {}) for event, details in rows]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str, str]]:
    """A node with the console on, three users, one processed study and dead deliveries.

    Yields the node, the console's base URL and the study's UID.
    """
    tmp = tmp_path_factory.mktemp("web")
    web_port = free_port()
    config = tmp / "dicomai.toml"
    # The destination's port is closed and deliveries expire after ~4 s: they die quickly.
    config.write_text(f"""
[web]
enabled = true
port = {web_port}
max_login_failures = 3

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
outputs = ["sc", "sr"]

[outbox]
poll_interval_s = 0.5
initial_backoff_s = 0.5
max_backoff_s = 1.0
max_age_h = 0.001

[scope]
body_parts = ["EXTREMITY"]  # the test image's; the shipped model's own list may leave it out
""")
    node = Node(data_dir=tmp / "data", config=config)
    node.cli("db", "upgrade")
    for (name, password), role in ((ADMIN, "admin"), (VIEWER, "viewer"), (THROTTLED, "viewer")):
        assert _users(node, "add", name, "--role", role, "--config", str(config),
                      password=password).returncode == 0
    node.start()
    try:
        study_uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp / "study")
        assert storescu(node.port, files).returncode == 0
        node.wait_state(study_uid, "processed", timeout=180)
        yield node, f"http://127.0.0.1:{web_port}", study_uid
    finally:
        node.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (which cannot fetch its own build here)."""
    if not CHROMIUM.exists():
        missing("chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page; a screenshot of the last page is kept."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    context.close()


def _login(page: Any, base: str, user: tuple[str, str], next_path: str = "/") -> None:
    page.goto(f"{base}/login?next={next_path}")
    page.fill("input[name=name]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _post_form(page: Any, action: str, csrf: str | None) -> None:
    """Submit a form the page did not offer, as a script on the page would."""
    with page.expect_navigation():
        page.evaluate("""([action, csrf]) => {
            const f = document.createElement("form");
            f.method = "post"; f.action = action;
            if (csrf !== null) {
                const i = document.createElement("input");
                i.type = "hidden"; i.name = "csrf"; i.value = csrf; f.appendChild(i);
            }
            document.body.appendChild(f); f.submit();
        }""", [action, csrf])


def _red_pixels(page: Any, selector: str) -> int:
    """Pixels of the image the browser decoded that are saturated red (a heat map's peak)."""
    return int(page.evaluate("""(selector) => {
        const i = document.querySelector(selector);
        const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
        const x = c.getContext('2d'); x.drawImage(i, 0, 0);
        const d = x.getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let k = 0; k < d.length; k += 4) if (d[k] - d[k + 1] > 80 && d[k] - d[k + 2] > 80) n++;
        return n;
    }""", selector))


@pytest.mark.integration
def test_logged_out_access_redirects_to_login(console: tuple[Node, str, str], page: Any) -> None:
    """Every page and picture without a session leads to the login page; a POST is refused."""
    node, base, study_uid = console
    for path in ("/", "/studies", f"/studies/{study_uid}", "/outbox", f"/studies/{study_uid}/images/1.png"):
        response = page.goto(base + path)
        assert page.url.startswith(f"{base}/login?next="), path
        assert response.status == 200 and page.locator("h1").inner_text() == "Log in"
        assert "Test" not in page.content()  # no patient data on the way
    refused = page.request.post(f"{base}/outbox/1/retry", form={"csrf": "x"}, max_redirects=0)
    assert refused.status == 403


@pytest.mark.integration
def test_worklist_and_study_page_show_the_heat_map(console: tuple[Node, str, str], page: Any,
                                                   tmp_path: Path) -> None:
    """After a wrong password, the admin logs in; the study sent by storescu is on the worklist
    (also found by accession number) and its page shows the overlay, loaded, with a red hotspot."""
    node, base, study_uid = console
    _login(page, base, (ADMIN[0], "wrong password"))
    assert "Wrong user name or password" in page.locator(".error").inner_text()
    _login(page, base, ADMIN, "/studies")
    assert page.url == f"{base}/studies"
    row = page.locator("table.worklist tbody tr", has_text="Test Patient")
    assert row.count() == 1
    assert "PID-SECRET-42" in row.inner_text() and "FUJI95706" in row.inner_text()
    page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)

    page.fill("input[name=q]", "FUJI95706")
    page.click("form.filters button")
    page.wait_for_load_state()
    assert page.locator("table.worklist tbody tr").count() == 1
    page.select_option("select[name=grade]", "failed")
    page.fill("input[name=q]", "")
    page.click("form.filters button")
    page.wait_for_load_state()
    assert "no study matches" in page.locator("table.worklist").inner_text()

    page.goto(f"{base}/studies/{study_uid}")
    img = page.locator(".images img").first
    img.scroll_into_view_if_needed()
    page.wait_for_function("() => { const i = document.querySelector('.images img');"
                           " return i.complete && i.naturalWidth > 0; }", timeout=60_000)
    size = page.evaluate("() => { const i = document.querySelector('.images img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert max(size) == 1024  # the 1760 px radiograph at the viewer's size
    red = _red_pixels(page, ".images img")
    assert red > 200, f"{red} red pixels"
    assert "probability" in page.locator("figcaption").first.inner_text()
    assert "pacs" in page.locator("table.deliveries").inner_text()
    page.screenshot(path=str(tmp_path / "study.png"), full_page=True)

    # Patient name and ID are shown to the logged-in user, never written to the node's log.
    log = node.log()
    assert "PID-SECRET-42" not in log and "Test^Patient" not in log
    logins = [(e, d["ip"]) for e, d in _events(node, "web.login%") if d.get("user") == ADMIN[0]]
    assert ("web.login_failed", "127.0.0.1") in logins and ("web.login", "127.0.0.1") in logins


@pytest.mark.integration
def test_outbox_retry_is_for_admins_only(console: tuple[Node, str, str], page: Any, browser: Any,
                                         tmp_path: Path) -> None:
    """A viewer sees dead rows without a retry button and a forged retry is refused (403, audited);
    the admin's retry queues the row again and is audited with the admin's name."""
    node, base, _ = console
    dead = _wait(lambda: json.loads(node.cli("outbox", "list", "--state", "dead", "--json").stdout),
                 60, "a dead delivery")
    item = dead[0]["id"]

    _login(page, base, VIEWER, "/outbox")
    assert page.locator(f"#outbox-{item}").count() == 1
    assert page.locator("button", has_text="Retry").count() == 0
    csrf = page.locator("form.logout input[name=csrf]").get_attribute("value")
    _post_form(page, f"/outbox/{item}/retry", csrf)
    assert "only an admin" in page.content()
    assert [d["item"] for e, d in _events(node, "web.denied")] == [item]
    assert not [d for e, d in _events(node, "outbox.retry_requested") if d["item"] == item]

    admin = browser.new_context().new_page()
    _login(admin, base, ADMIN, "/outbox")
    admin.locator(f"#outbox-{item} button", has_text="Retry").click()
    admin.wait_for_load_state()
    assert f"Row {item} queued again." in admin.locator(".notice").inner_text()
    admin.screenshot(path=str(tmp_path / "outbox.png"), full_page=True)
    assert [d["item"] for e, d in _events(node, "outbox.retry_requested")] == [item]
    assert [(d["user"], d["item"]) for e, d in _events(node, "web.outbox_retry")] == [(ADMIN[0], item)]
    admin.context.close()


@pytest.mark.integration
def test_post_without_the_csrf_token_is_refused(console: tuple[Node, str, str], page: Any) -> None:
    """A logged-in admin's form without the token, or with another session's, gets 403 and
    changes nothing; a login form without its token too."""
    node, base, _ = console
    before = len(_events(node, "outbox.retry_requested"))
    _login(page, base, ADMIN, "/outbox")
    statuses: list[int] = []
    page.on("response", lambda r: r.url.endswith("/retry") and statuses.append(r.status))
    _post_form(page, "/outbox/1/retry", None)
    _post_form(page, "/outbox/1/retry", csrf_token(b"0" * 64, "another session"))
    assert statuses == [403, 403]
    assert "security token" in page.content()
    assert len(_events(node, "outbox.retry_requested")) == before
    # Still logged in: a refused form does not end the session.
    page.goto(f"{base}/outbox")
    assert page.url == f"{base}/outbox"

    fresh = page.context.browser.new_context().new_page()
    fresh.goto(f"{base}/login")
    refused = fresh.request.post(f"{base}/login", form={"name": ADMIN[0], "password": ADMIN[1]})
    assert refused.status == 403
    fresh.context.close()


@pytest.mark.integration
def test_logins_are_throttled_per_user_and_address(console: tuple[Node, str, str], page: Any) -> None:
    """After max_login_failures wrong passwords even the right one is refused (429, audited);
    logging out ends the session."""
    node, base, _ = console
    for _ in range(3):
        _login(page, base, (THROTTLED[0], "not the password"))
    _login(page, base, THROTTLED)
    assert "Too many failed logins" in page.locator(".error").inner_text()
    assert [d["user"] for e, d in _events(node, "web.login_throttled")] == [THROTTLED[0]]

    _login(page, base, VIEWER)  # another user from the same address is not held up
    assert page.url == f"{base}/"
    assert page.locator(".who").inner_text() == "bob (viewer)"
    page.click("form.logout button")
    page.wait_for_load_state()
    assert page.url == f"{base}/login"
    page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/login")
    assert os.path.exists(node.data_dir / "web-secret.key")


@pytest.mark.integration
def test_radiologist_records_a_final_read_and_the_dashboard_counts_it(console: tuple[Node, str, str],
                                                                     page: Any, tmp_path: Path) -> None:
    """A viewer records a final read with a note on the study page; it is stored (as the CLI's
    are) under the viewer's name, and the dashboard shows PPV/NPV over it, the time from last
    instance to result of today's study and the free disk."""
    node, base, study_uid = console
    _login(page, base, VIEWER, f"/studies/{study_uid}")
    page.check("input[name=read][value=fracture]")
    page.fill("textarea[name=note]", "undisplaced, distal")
    page.click("form.feedback button[type=submit]")
    page.wait_for_load_state()
    assert page.url == f"{base}/studies/{study_uid}?read=recorded#feedback"
    assert "Your read is recorded." in page.locator(".notice").inner_text()
    row = page.locator("table.reads tbody tr").first.inner_text()
    assert "fracture confirmed" in row and VIEWER[0] in row and "undisplaced, distal" in row
    page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)
    assert [d["by"] for e, d in _events(node, "feedback.recorded")] == [VIEWER[0]]
    assert "undisplaced" not in node.log()  # the note may name the patient: kept in its table only

    page.goto(f"{base}/")
    assert "(1 studies;" in page.locator("table.performance caption").inner_text()
    median = page.locator("#turnaround-median").inner_text()
    assert re.fullmatch(r"\d+\.\d (s|min)", median), median
    assert " GB (" in page.locator("#disk-free").inner_text()
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


@pytest.mark.integration
def test_try_page_grades_an_upload_and_stores_nothing(console: tuple[Node, str, str], page: Any,
                                                      tmp_path: Path) -> None:
    """An uploaded DICOM radiograph gets a grade, a probability and its overlay (loaded, with a red
    hotspot), labelled a demonstration; the node has no new study; a text file gets a clear error."""
    node, base, _ = console
    _login(page, base, VIEWER, "/try")
    assert "not for diagnosis" in page.locator(".demo").inner_text()
    page.set_input_files("input[name=file]", str(pydicom_data("RG3_UNCR.dcm")))
    page.click("form.upload button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("#try-grade").inner_text() in ("positive", "doubtful", "negative")
    assert re.fullmatch(r"0\.\d{3}", page.locator("#try-probability").inner_text())
    page.wait_for_function("() => { const i = document.querySelector('.result img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
    red = _red_pixels(page, ".result img")
    assert red > 200, f"{red} red pixels"
    page.screenshot(path=str(tmp_path / "try.png"), full_page=True)
    assert len(node.studies()) == 1

    bad = tmp_path / "notes.txt"
    bad.write_text("not a radiograph\n" * 20)
    page.set_input_files("input[name=file]", str(bad))
    page.click("form.upload button[type=submit]")
    page.wait_for_load_state()
    assert "not a DICOM (Part 10), PNG or JPEG file" in page.locator(".error").inner_text()


@pytest.mark.integration
def test_model_page_shows_the_shipped_card(console: tuple[Node, str, str], page: Any, tmp_path: Path) -> None:
    """The model page shows the loaded package's card, its operating points and test figures."""
    _, base, _ = console
    _login(page, base, VIEWER, "/model")
    assert page.locator(".card h1").inner_text().startswith("Model card: ")
    assert page.locator("table.points tbody tr").count() >= 1
    assert "AUROC" in page.locator("table.figures").inner_text()
    page.screenshot(path=str(tmp_path / "model.png"), full_page=True)

"""``dicomai check``: one row per item, a clear FAIL line for each broken one, exit 0 or 1."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, VerificationPresentationContexts

from dicomai.cli import main
from dicomai.node import default_model_dir
from dicomai.store.db import make_engine, upgrade
from tests.helpers import free_port


@pytest.fixture
def echo_scp() -> Iterator[int]:
    """A real C-ECHO SCP (pynetdicom) on a free loopback port."""
    ae = AE(ae_title="PACS")
    ae.supported_contexts = VerificationPresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo_scp: int) -> Path:
    """A configuration where every check passes: migrated SQLite, shipped model, live peer."""
    for name in [n for n in os.environ if n.startswith("DICOMAI_") and not n.startswith("DICOMAI_TEST_")]:
        monkeypatch.delenv(name)
    if default_model_dir() is None:
        pytest.skip("this build ships no model")
    data = tmp_path / "data"
    upgrade(make_engine(f"sqlite:///{data / 'audit.sqlite3'}"))
    monkeypatch.setenv("DICOMAI_NODE__DATA_DIR", str(data))
    monkeypatch.setenv("DICOMAI_STORAGE__MIN_FREE_MB", "1")
    monkeypatch.setenv("DICOMAI_MODEL__PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("DICOMAI_DESTINATIONS", json.dumps(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": echo_scp}]))
    return data


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", *args])
    return code, capsys.readouterr().out


def rows(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, dict[str, object]]]:
    code, out = run_check(capsys, "--json")
    return code, {r["item"]: r for r in json.loads(out)}


def test_everything_in_order_exits_0(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Migrated database, shipped model, disk above the floor and an answering peer: exit 0."""
    code, found = rows(capsys)
    assert code == 0, found
    assert list(found) == ["config", "database", "model", "scope", "thresholds", "disk", "destination pacs"]
    assert all(r["ok"] for r in found.values())
    assert "body parts from the model's validated list (17); empty: analysed" in str(found["scope"]["detail"])
    assert "WARNING" not in str(found["scope"]["detail"])
    assert "the model's" in str(found["thresholds"]["detail"])
    assert "no site profile" in str(found["thresholds"]["detail"])
    assert "status 0x0000" in str(found["destination pacs"]["detail"])
    code, table = run_check(capsys)
    assert code == 0
    assert table.splitlines()[0].split() == ["item", "result", "detail"]


def test_bad_destination_port_fails(setup: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination on a port where nothing listens is one FAIL row; exit 1."""
    port = free_port()
    monkeypatch.setenv("DICOMAI_DESTINATIONS", json.dumps(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]))
    code, table = run_check(capsys)
    assert code == 1
    (line,) = [x for x in table.splitlines() if "FAIL" in x]
    assert line.startswith("destination pacs") and f"PACS@127.0.0.1:{port}" in line
    assert "association failed" in line


def test_database_down_fails(setup: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL URL to a closed port: the database row says it cannot connect."""
    pytest.importorskip("psycopg")
    port = free_port()
    monkeypatch.setenv("DICOMAI_DATABASE__URL", f"postgresql+psycopg://dicomai:secret@127.0.0.1:{port}/x")
    code, found = rows(capsys)
    assert code == 1
    assert [k for k, r in found.items() if not r["ok"]] == ["database"]
    detail = str(found["database"]["detail"])
    assert detail.startswith(f"cannot connect to postgresql+psycopg://dicomai:***@127.0.0.1:{port}/x")
    assert "secret" not in detail


def test_database_behind_fails(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A database at an older revision names the command that migrates it."""
    from dicomai.store.db import downgrade

    downgrade(make_engine(f"sqlite:///{setup / 'audit.sqlite3'}"), "0001")
    code, found = rows(capsys)
    assert code == 1
    assert "is at revision 0001" in str(found["database"]["detail"])
    assert "dicomai db upgrade" in str(found["database"]["detail"])


def test_wrong_model_hash_fails(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A package whose model.onnx does not match the manifest's sha256 fails the model row."""
    shipped = default_model_dir()
    assert shipped is not None
    bad = tmp_path / "bad-model"
    bad.mkdir()
    manifest = json.loads((shipped / "model.json").read_text())
    manifest["sha256"] = "0" * 64
    (bad / "model.json").write_text(json.dumps(manifest))
    (bad / "model.onnx").symlink_to(shipped / "model.onnx")
    monkeypatch.setenv("DICOMAI_MODEL__PATH", str(bad))
    code, found = rows(capsys)
    assert code == 1
    assert [k for k, r in found.items() if not r["ok"]] == ["model"]
    assert "does not match the manifest's 0000" in str(found["model"]["detail"])


def test_disk_floor_above_free_space_fails(setup: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.min_free_mb above the free space fails the disk row, naming the key."""
    monkeypatch.setenv("DICOMAI_STORAGE__MIN_FREE_MB", str(2**40))
    code, found = rows(capsys)
    assert code == 1
    assert [k for k, r in found.items() if not r["ok"]] == ["disk"]
    assert "storage.min_free_mb" in str(found["disk"]["detail"])


def test_thresholds_show_the_site_profile_and_a_broken_one_fails(setup: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """After `dicomai calibrate` the admin sees the profile in force (who, when, on how many
    cases, the points); a profile the node cannot read fails the check, as it stops the node."""
    from dicomai.model.package import load_package
    from dicomai.model.profile import PROFILE_NAME

    model = default_model_dir()
    assert model is not None
    m = load_package(model, check_hash=False).manifest
    profile = {"model_name": m.name, "model_version": m.version, "model_sha256": m.sha256,
               "created_at": "2026-11-30T10:00:00Z", "by": "dr-a", "cases": 480, "positives": 240,
               "targets": {"sensitivity": 0.9}, "operating_points": {"high_sensitivity": 0.21,
                                                                     "high_specificity": 0.83},
               "body_parts": {"HAND": {"operating_points": {"high_sensitivity": 0.3, "high_specificity": 0.9},
                                       "cases": 300, "positives": 150}}}
    (setup / PROFILE_NAME).write_text(json.dumps(profile))
    code, found = rows(capsys)
    detail = str(found["thresholds"]["detail"])
    assert code == 0 and found["thresholds"]["ok"], detail
    assert "site profile by dr-a on 2026-11-30, 480 cases (240 fractured)" in detail
    assert "0.210 / 0.830" in detail and "HAND" in detail
    # the node says the same in its log when it starts
    from structlog.testing import capture_logs

    from dicomai.config import load_settings
    from dicomai.node import build_stage
    from dicomai.store import make_sessionmaker, open_database

    settings = load_settings(None)
    with capture_logs() as logs:
        build_stage(settings, make_sessionmaker(open_database(settings.database_url, create=False)))
    (started,) = [e for e in logs if e["event"] == "model.thresholds"]
    assert started["detail"] == detail

    (setup / PROFILE_NAME).write_text(json.dumps({**profile, "model_sha256": "0" * 64}))
    code, found = rows(capsys)
    assert code == 0
    assert "site profile ignored: calibrated for another model" in str(found["thresholds"]["detail"])

    (setup / PROFILE_NAME).write_text("{")
    code, found = rows(capsys)
    assert code == 1 and not found["thresholds"]["ok"]
    assert "not valid JSON" in str(found["thresholds"]["detail"])


def test_scope_row_warns_when_unrecognised_body_parts_are_analysed(
        setup: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration that sets analyse_unknown_body_part = true is named in the preflight: it
    analyses outside the validated scope."""
    monkeypatch.setenv("DICOMAI_SCOPE__ANALYSE_UNKNOWN_BODY_PART", "true")
    code, found = rows(capsys)
    assert code == 0
    assert "WARNING: values the node cannot recognise are analysed" in str(found["scope"]["detail"])

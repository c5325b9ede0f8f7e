"""Tests of the audit schema's migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomai.errors import DatabaseBehindError
from dicomai.store import current_revision, downgrade, head_revision, make_engine, open_database, upgrade
from dicomai.store.models import Base

TABLES = {"associations", "studies", "series", "instances", "quarantine", "events", "predictions"}


def test_upgrade_from_empty_and_round_trip(db_url: str) -> None:
    """Upgrade from empty, downgrade to base, upgrade again: same tables, head revision."""
    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert not TABLES & set(sa.inspect(engine).get_table_names())
    upgrade(engine)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES


def test_migrations_match_models(db_url: str) -> None:
    """The head migration creates exactly the columns the ORM models declare."""
    engine = make_engine(db_url)
    upgrade(engine)
    insp = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        migrated = {c["name"] for c in insp.get_columns(table.name)}
        assert migrated == {c.name for c in table.columns}, table.name


def test_open_creates_new_and_refuses_behind(db_url: str) -> None:
    """A new database is created at head; one that is behind is refused with advice."""
    engine = open_database(db_url)
    assert current_revision(engine) == head_revision(engine)
    downgrade(engine, "base")
    with engine.begin() as conn:  # a database with tables but an old revision
        conn.execute(sa.text("CREATE TABLE legacy (id INTEGER)"))
    with pytest.raises(DatabaseBehindError) as err:
        open_database(db_url)
    assert "dicomai db upgrade" in str(err.value)


def test_node_refuses_outdated_database(tmp_path: Path) -> None:
    """`dicomai serve` exits 3 on an outdated database and names the fix."""
    data = tmp_path / "data"
    env = {"DICOMAI_NODE__DATA_DIR": str(data), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "dicomai"]
    assert subprocess.run([*run, "db", "upgrade"], env=env, capture_output=True).returncode == 0
    assert subprocess.run([*run, "db", "downgrade", "base"], env=env, capture_output=True).returncode == 0
    engine = make_engine(f"sqlite:///{data / 'audit.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE legacy (id INTEGER)"))
    out = subprocess.run([*run, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "run `dicomai db upgrade`" in out.stderr
    assert subprocess.run([*run, "db", "upgrade"], env=env, capture_output=True).returncode == 0
    cur = subprocess.run([*run, "db", "current"], env=env, capture_output=True, text=True)
    current, head = cur.stdout.split()[1], cur.stdout.split()[3]
    assert cur.returncode == 0 and current == head != "base"

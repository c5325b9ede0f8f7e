"""Fixtures: audit database URLs (SQLite and PostgreSQL) and the node as a subprocess."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Node, missing, require_train_extra

PG_BASE = os.environ.get("DICOMAI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``train`` needs the train extra (skips, or fails in CI; see helpers)."""
    if item.get_closest_marker("train") is not None:
        require_train_extra()


@pytest.fixture(autouse=True)
def _strict_pydicom() -> Iterator[None]:
    """Run pydicom in strict validation mode, as STYLE.md asks."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode = old


def _postgres_url() -> Iterator[str]:
    try:
        import psycopg
    except ImportError:
        missing("psycopg (pip install psycopg[binary])")
    from sqlalchemy.engine import make_url

    base = make_url(PG_BASE)
    name = f"dicomai_test_{uuid.uuid4().hex[:10]}"
    admin = f"host={base.host} port={base.port or 5432} user={base.username} dbname={base.database}"
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL at {base.host}:{base.port}: {exc}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty audit database: SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    else:
        yield from _postgres_url()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[type[Node]]:
    """Create nodes; every node started through it is stopped at teardown."""
    started: list[Node] = []

    class _Node(Node):
        def start(self, wait: bool = True) -> Node:
            started.append(self)
            return super().start(wait)

    yield _Node
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory: type[Node], tmp_path: Path) -> Node:
    """A running node on SQLite in a temporary data directory."""
    return node_factory(data_dir=tmp_path / "data").start()

"""Engine creation and schema management (Alembic) for the audit database."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomai.errors import DatabaseBehindError, DatabaseError

__all__ = [
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "open_database",
    "upgrade",
]


def _migrations_dir() -> str:
    return str(files("dicomai._migrations"))


def make_engine(url: str, echo: bool = False) -> Engine:
    """One engine per process. SQLite gets WAL, FULL sync and write-locking transactions."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, echo=echo, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (see below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, not only a killed process.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # A deferred transaction that reads and then writes fails at once with
            # SQLITE_BUSY under WAL when another writer got in between; taking the write
            # lock up front makes concurrent associations wait instead.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, echo=echo, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def head_revision(engine: Engine) -> str:
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _run(engine: Engine, fn: Any, revision: str) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        fn(cfg, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` for an empty database)."""
    _run(engine, command.downgrade, revision)


def open_database(url: str, echo: bool = False, create: bool = True) -> Engine:
    """Open the audit database for the node.

    A database without any table is created at the head revision (when ``create``);
    one that is behind or ahead of the code raises :class:`DatabaseBehindError`.
    """
    engine = make_engine(url, echo=echo)
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        current = current_revision(engine)
        tables = sa.inspect(engine).get_table_names()
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot open audit database {safe_url}: {exc.orig}") from None
    head = head_revision(engine)
    if current is None and not tables and create:
        upgrade(engine, "head")
        return engine
    if current != head:
        raise DatabaseBehindError(safe_url, current, head)
    return engine

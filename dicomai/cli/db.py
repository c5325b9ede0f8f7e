"""``dicomai db``: the audit database's schema revision."""

from __future__ import annotations

import argparse

from dicomai.cli import ExitCode, Subparsers
from dicomai.config import Settings
from dicomai.store.db import current_revision, downgrade, head_revision, make_engine, upgrade

__all__ = ["cmd_db_current", "cmd_db_downgrade", "cmd_db_upgrade", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``db upgrade``, ``db downgrade`` and ``db current``."""
    db = subparsers.add_parser("db", parents=[common], help="audit database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dbsub.add_parser("upgrade", parents=[common], help="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    down = dbsub.add_parser("downgrade", parents=[common], help="revert migrations")
    down.add_argument("revision", help="target revision, e.g. base or 0001")
    down.set_defaults(func=cmd_db_downgrade)
    cur = dbsub.add_parser("current", parents=[common], help="show the schema revision")
    cur.set_defaults(func=cmd_db_current)


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the database (created if missing) up to ``args.revision``."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine, args.revision)
    print(f"audit database at revision {current_revision(engine)}")
    return ExitCode.OK


def cmd_db_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the database down to ``args.revision``."""
    engine = make_engine(settings.database_url)
    downgrade(engine, args.revision)
    print(f"audit database at revision {current_revision(engine) or 'base'}")
    return ExitCode.OK


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    """Print the current and head revisions; 3 when they differ."""
    engine = make_engine(settings.database_url)
    cur, head = current_revision(engine), head_revision(engine)
    print(f"current: {cur or 'base'}  head: {head}")
    return ExitCode.OK if cur == head else ExitCode.DATABASE

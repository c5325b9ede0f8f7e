"""The ``dicomai`` command line.

One module per command group (``node``, ``db``, ``studies``, ``outbox``, ``model``,
``classify``, ``config``), each with ``register(subparsers, common)`` and its ``cmd_*``
functions. Optional command groups (training) are plug-ins found through the
``dicomai.commands`` entry point group, so the node imports none of their code.

Exit codes: 0 success, 1 failure (a peer refused, an object is missing), 2 usage or
configuration error or a missing extra, 3 audit database missing or at the wrong schema revision.
A failure is one line on stderr, never a traceback for an operator's mistake; stdout carries
only the command's output (``--json`` pipes into ``jq``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

from sqlalchemy.orm import Session, sessionmaker

from dicomai import __version__
from dicomai.config import Settings, find_config, load_settings
from dicomai.errors import DicomaiError
from dicomai.logging import configure_logging

__all__ = [
    "Command",
    "ExitCode",
    "Parser",
    "Subparsers",
    "cell",
    "common_parser",
    "iso",
    "json_flag",
    "main",
    "missing_extra",
    "print_table",
    "sessions",
]

PLUGIN_GROUP = "dicomai.commands"
# What a plug-in's commands are called in the line that names its missing extra.
_PLUGIN_TITLES = {"train": "training"}
# Database drivers SQLAlchemy imports for a URL, and what the operator should do without them.
_DRIVER_HINTS = {
    "psycopg": "a postgresql+psycopg:// database.url needs the postgres extra: "
               "pip install 'dicomai[postgres]'",
    "psycopg2": "database.url: use postgresql+psycopg://... (the driver of the postgres extra, "
                "pip install 'dicomai[postgres]'); postgresql:// asks for psycopg2",
}

Subparsers = argparse._SubParsersAction  # noqa: SLF001  (argparse has no public name for it)
Command = Callable[[argparse.Namespace, Settings], int]


class Register(Protocol):
    def __call__(self, subparsers: Subparsers[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None: ...


class ExitCode(IntEnum):
    """What the ``dicomai`` process's exit status means."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    DATABASE = 3


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not ``None`` or ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit 2) and whose help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def common_parser() -> argparse.ArgumentParser:
    """The options every command accepts, before or after its name."""
    p = Parser(add_help=False)
    # SUPPRESS: a value given before the sub-command is not reset by the sub-parser.
    p.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML configuration file (default: $DICOMAI_CONFIG, else "
                   "/etc/dicomai/dicomai.toml if it exists, else the embedded defaults)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                   help="data directory (node.data_dir)")
    return p


def json_flag(p: argparse.ArgumentParser) -> None:
    """Add ``--json``: machine-readable output instead of a table."""
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cell(value: Any) -> str:
    """A table cell: ``-`` for no value, probabilities and other floats to 3 decimals."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as left-aligned columns, or ``(none)``."""
    if not rows:
        print("(none)")
        return
    text = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


def iso(value: dt.datetime | None) -> str | None:
    """``value`` in ISO 8601, or ``None``."""
    return value.isoformat() if value else None


def sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the configured audit database, which must exist at the current revision."""
    from dicomai.store.db import make_sessionmaker, open_database

    return make_sessionmaker(open_database(settings.database_url, create=False))


def missing_extra(title: str, extra: str) -> int:
    """Say which extra a command group needs; the exit code to return."""
    print(f"dicomai: the {title} commands need the {extra} extra: pip install 'dicomai[{extra}]'",
          file=sys.stderr)
    return ExitCode.USAGE


def _missing_plugin(ep: EntryPoint, subparsers: Subparsers[argparse.ArgumentParser],
                    common: argparse.ArgumentParser) -> None:
    """Stand in for a plug-in whose dependencies are not installed, so its name still answers."""
    title = _PLUGIN_TITLES.get(ep.name, ep.name)
    p = subparsers.add_parser(ep.name, parents=[common], add_help=False,
                              help=f"{title} commands (need the {ep.name} extra)")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def cmd_missing(args: argparse.Namespace, settings: Settings) -> int:
        return missing_extra(title, ep.name)

    p.set_defaults(func=cmd_missing)


def _register_plugins(subparsers: Subparsers[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register: Register = ep.load()
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] == "dicomai":
                raise  # a bug in dicomai, not a missing extra
            _missing_plugin(ep, subparsers, common)
            continue
        register(subparsers, common)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree: the node's groups, then the plug-ins'."""
    # Imported here: each group's module imports what its commands need only when they run.
    from dicomai.cli import (
        calibrate,
        check,
        classify,
        config,
        db,
        drift,
        feedback,
        model,
        node,
        outbox,
        purge,
        studies,
        users,
    )

    common = common_parser()
    parser = Parser(
        prog="dicomai", parents=[common],
        description="DICOM AI node for bone-fracture triage on radiographs. Every setting can "
        "also be given as DICOMAI_<SECTION>__<KEY> (e.g. DICOMAI_NODE__PORT=104).",
    )
    parser.add_argument("--version", action="version", version=f"dicomai {__version__}")
    sub = cast("Subparsers[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    node.register(sub, common)
    db.register(sub, common)
    studies.register(sub, common)
    outbox.register(sub, common)
    purge.register(sub, common)
    model.register(sub, common)
    feedback.register(sub, common)  # this and drift add `model performance`, `model drift`
    drift.register(sub, common)
    calibrate.register(sub, common)
    classify.register(sub, common)
    check.register(sub, common)
    users.register(sub, common)
    _register_plugins(sub, common)
    config.register(sub, common)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from the file a command finds, the environment and the flags."""
    path, _named_by = find_config(getattr(args, "config", None), os.environ)
    overrides: dict[str, Any] = {}
    node: dict[str, Any] = {}
    if getattr(args, "data_dir", None) is not None:
        node["data_dir"] = args.data_dir
    if args.command == "serve":
        for key in ("host", "port", "ae_title"):
            if getattr(args, key, None) is not None:
                node[key] = getattr(args, key)
    if node:
        overrides["node"] = node
    return load_settings(path, overrides, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the process's exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        settings = _settings(args)
        # The node logs to stdout (the journal); every other command keeps stdout for its output.
        configure_logging(settings.logging, stream=sys.stdout if args.command == "serve" else sys.stderr)
        return func(args, settings)
    except DicomaiError as exc:
        print(f"dicomai: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        hint = _DRIVER_HINTS.get((exc.name or "").partition(".")[0])
        if hint is None:
            raise  # a bug or a broken install, not an operator's choice
        print(f"dicomai: {hint}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0

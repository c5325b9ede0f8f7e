"""``dicomai check``: a preflight of configuration, database, model, disk and destinations."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from dicomai.cli import ExitCode, Subparsers, json_flag, print_table
from dicomai.config import Settings
from dicomai.ops.checks import (
    Check,
    check_certificate,
    check_database,
    check_destination,
    check_disk,
    check_key,
    check_model,
    check_scope,
    check_thresholds,
)

__all__ = ["cmd_check", "register", "run_checks", "sqlite_path", "tls_checks"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``check``."""
    p = subparsers.add_parser("check", parents=[common],
                              help="preflight: database, model, disk, certificates and a C-ECHO to every "
                                   "destination")
    json_flag(p)
    p.set_defaults(func=cmd_check)


def run_checks(args: argparse.Namespace, settings: Settings) -> list[Check]:
    """Every check, in the order a node needs them; none stops the others."""
    from dicomai.store.db import make_engine

    source = getattr(args, "config", None)
    checks = [Check("config", True, f"{source or 'embedded defaults and environment'}; "
                                    f"{len(settings.destinations)} destination(s)")]
    url = settings.database_url
    sqlite_file = sqlite_path(url)
    if sqlite_file is not None and not sqlite_file.exists():
        # Opening it would create an empty file; say what to run instead.
        checks.append(Check("database", False, f"no database at {sqlite_file}: run `dicomai db upgrade`"))
    else:
        try:
            engine = make_engine(url)
        except ImportError as exc:  # the URL's driver is not installed
            checks.append(Check("database", False, f"no driver for {url.partition(':')[0]}: {exc}; "
                                                   "pip install 'dicomai[postgres]'"))
        else:
            checks.append(check_database(engine))
            engine.dispose()
    checks.append(check_model(settings))
    checks.append(check_scope(settings))
    checks.append(check_thresholds(settings))
    checks.append(check_disk(settings))
    checks.extend(tls_checks(settings))
    checks.extend(check_destination(settings, d) for d in settings.destinations)
    return checks


def tls_checks(settings: Settings) -> list[Check]:
    """Expiry of every certificate and the permissions of every private key the node uses."""
    loose = settings.tls.allow_loose_key_permissions
    checks = []
    if settings.tls.enabled:
        tls = settings.tls
        assert tls.certificate is not None and tls.private_key is not None
        checks += [check_certificate("tls.certificate", tls.certificate),
                   check_key("tls.private_key", tls.private_key, loose)]
        if tls.ca_certificates is not None:
            checks.append(check_certificate("tls.ca_certificates", tls.ca_certificates))
    for d in settings.destinations:
        key = f"destinations.{d.name}"
        if d.ca_certificates is not None:
            checks.append(check_certificate(f"{key}.ca_certificates", d.ca_certificates))
        if d.client_certificate is not None and d.client_key is not None:
            checks += [check_certificate(f"{key}.client_certificate", d.client_certificate),
                       check_key(f"{key}.client_key", d.client_key, loose)]
    return checks


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Print one row per check; 1 when any failed."""
    checks = run_checks(args, settings)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print_table([{"item": c.item, "result": ("WARN" if c.warn else "ok") if c.ok else "FAIL",
                      "detail": c.detail} for c in checks], ["item", "result", "detail"])
    return ExitCode.OK if all(c.ok for c in checks) else ExitCode.FAILURE

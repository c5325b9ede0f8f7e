"""``dicomai purge``: run the retention purge now, or see what it would delete."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dicomai.cli import ExitCode, Subparsers, iso, json_flag, print_table, sessions
from dicomai.config import Settings
from dicomai.ops.retention import Doomed, PurgeReport, purge
from dicomai.store.retention import PurgeFile

__all__ = ["cmd_purge", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``purge``."""
    p = subparsers.add_parser(
        "purge", parents=[common],
        help="delete files past their retention ([retention]); the audit rows stay",
        description="Delete the files of finished studies (processed or failed, nothing left in "
        "the outbox) older than the [retention] settings, and more, oldest first, while the disk "
        "is above retention.high_watermark_pct. The node does this every retention.interval_min.")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    json_flag(p)
    p.set_defaults(func=cmd_purge)


def _file(f: PurgeFile) -> dict[str, Any]:
    return {"kind": f.kind.value, "study_instance_uid": f.study_instance_uid, "path": f.path,
            "since": iso(f.since)}


def _doomed(d: Doomed) -> dict[str, Any]:
    return {**_file(d.file), "size_bytes": d.size, "reason": d.reason}


def _json(report: PurgeReport) -> dict[str, Any]:
    return {"dry_run": report.dry_run, "used_pct": round(report.used_pct, 1),
            "used_pct_after": round(report.used_pct_after, 1), "pressure": report.pressure,
            "unrelieved": report.unrelieved, "bytes": report.size,
            "files": [_doomed(d) for d in report.files],
            "leftovers": [_file(f) for f in report.leftovers]}


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Purge (or with ``--dry-run`` list) the files past retention; 2 while another purge runs."""
    report = purge(settings, sessions(settings), dry_run=args.dry_run)
    data = _json(report)
    if args.json:
        print(json.dumps(data, indent=2))
        return ExitCode.OK
    print_table(data["files"], ["kind", "study_instance_uid", "path", "size_bytes", "reason"])
    verb = "would be deleted" if report.dry_run else "deleted"
    if report.leftovers:
        print(f"{len(report.leftovers)} file(s) left by an interrupted purge {verb}")
    print(f"{len(report.files)} file(s), {report.size / 2**20:.1f} MiB {verb}; disk "
          f"{report.used_pct:.1f}% used, {report.used_pct_after:.1f}% after")
    if report.unrelieved:
        print(f"still above retention.low_watermark_pct ({settings.retention.low_watermark_pct:g}%): "
              "nothing else is finished (studies wait for processing or delivery)")
    return ExitCode.OK

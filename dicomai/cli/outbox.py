"""``dicomai outbox``: the delivery queue of result objects."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from dicomai.cli import ExitCode, Subparsers, iso, json_flag, print_table, sessions
from dicomai.config import Settings
from dicomai.store.models import OutboxState
from dicomai.store.outbox import retry_outbox
from dicomai.store.queries import OutboxListing, list_outbox

__all__ = ["cmd_outbox_list", "cmd_outbox_retry", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``outbox list`` and ``outbox retry``."""
    outbox = subparsers.add_parser("outbox", parents=[common], help="delivery of result objects")
    osub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    ols = osub.add_parser("list", parents=[common], help="outbox rows, newest first")
    ols.add_argument("--state", choices=[s.value for s in OutboxState])
    ols.add_argument("--destination")
    ols.add_argument("--study", help="StudyInstanceUID")
    ols.add_argument("--limit", type=int, default=100)
    json_flag(ols)
    ols.set_defaults(func=cmd_outbox_list)
    retry = osub.add_parser("retry", parents=[common],
                            help="queue rows again now (a running node picks them up at its next poll)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    which.add_argument("--dead", action="store_true", help="every dead row")
    retry.set_defaults(func=cmd_outbox_retry)


def _outbox_row(row: OutboxListing) -> dict[str, Any]:
    item, result = row.item, row.result
    return {"id": item.id, "destination": item.destination, "state": item.state, "kind": result.kind,
            "attempts": item.attempts, "created_at": iso(item.created_at),
            "next_attempt_at": iso(item.next_attempt_at) if item.state == OutboxState.PENDING else None,
            "last_attempt_at": iso(item.last_attempt_at), "sent_at": iso(item.sent_at),
            "expires_at": iso(item.expires_at),
            "last_status": None if item.last_status is None else f"0x{item.last_status:04X}",
            "last_error": item.last_error, "study_instance_uid": row.study_instance_uid,
            "sop_instance_uid": result.sop_instance_uid}


def cmd_outbox_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print outbox rows, newest first, filtered by state, destination and study."""
    with sessions(settings)() as s:
        rows = [_outbox_row(row) for row in list_outbox(s, state=args.state, destination=args.destination,
                                                        study_instance_uid=args.study, limit=args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["id", "destination", "kind", "state", "attempts", "next_attempt_at",
                           "last_status", "last_error"])
    return ExitCode.OK


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the given (or every dead) row now, with a fresh expiry; 1 if an id is unknown."""
    now = dt.datetime.now(dt.UTC)
    result = retry_outbox(sessions(settings), None if args.dead else args.ids, now,
                          now + dt.timedelta(hours=settings.outbox.max_age_h))
    if result.missing:
        print(f"no outbox row {', '.join(map(str, result.missing))}", file=sys.stderr)
        return ExitCode.FAILURE
    for item_id in result.resent:
        print(f"row {item_id} was sent already; queued again on request", file=sys.stderr)
    print(f"{len(result.queued)} row(s) queued")
    return ExitCode.OK

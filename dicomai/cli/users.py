"""``dicomai users``: the people who may log in to the web console.

A password is read from standard input (its first line) when that is not a terminal, so a
script can pipe it in; at a terminal it is asked for twice, without echo. Every change is
written to the audit log with the operating-system user who made it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from dicomai.cli import ExitCode, Subparsers, iso, json_flag, print_table, sessions
from dicomai.cli.feedback import current_user
from dicomai.config import Settings
from dicomai.errors import UsageError
from dicomai.store.events import record_event
from dicomai.store.models import UserRole, utcnow
from dicomai.store.users import add_user, list_users, remove_user
from dicomai.web.passwords import MIN_LENGTH, hash_password

__all__ = ["cmd_users_add", "cmd_users_list", "cmd_users_remove", "read_password", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``users add``, ``users remove`` and ``users list``."""
    users = subparsers.add_parser("users", parents=[common], help="web console users")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = usub.add_parser("add", parents=[common],
                          help=f"add a user; the password (at least {MIN_LENGTH} characters) from "
                          "standard input, or asked for at a terminal")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in UserRole],
                     help="admin: may also retry deliveries; viewer: reads only")
    add.set_defaults(func=cmd_users_add)
    rm = usub.add_parser("remove", parents=[common], help="remove a user and end their sessions")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_users_remove)
    ls = usub.add_parser("list", parents=[common], help="users, by name")
    json_flag(ls)
    ls.set_defaults(func=cmd_users_list)


def read_password() -> str:
    """The new password: stdin's first line, or asked for twice at a terminal."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise UsageError("the two passwords differ")
    return first


def _name(value: str) -> str:
    name = value.strip()
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise UsageError(f"{value!r} is not a user name (1-64 characters, no spaces)")
    return name


def cmd_users_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add a user with a password; 1 when the name is taken."""
    name = _name(args.name)
    try:
        password_hash = hash_password(read_password())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with sessions(settings).begin() as s:
        account = add_user(s, name, UserRole(args.role), password_hash, utcnow())
        if account is None:
            print(f"dicomai: user {name} exists already (remove it first to change it)", file=sys.stderr)
            return ExitCode.FAILURE
        record_event(s, "admin", "user.added",
                     details={"user": name, "role": args.role, "by": current_user()})
    print(f"user {name} added ({args.role})")
    return ExitCode.OK


def cmd_users_remove(args: argparse.Namespace, settings: Settings) -> int:
    """Remove a user and end their console sessions; 1 when there is no such user."""
    with sessions(settings).begin() as s:
        if not remove_user(s, args.name):
            print(f"dicomai: no user {args.name}", file=sys.stderr)
            return ExitCode.FAILURE
        record_event(s, "admin", "user.removed", details={"user": args.name, "by": current_user()})
    print(f"user {args.name} removed")
    return ExitCode.OK


def cmd_users_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print the users (never their password hashes)."""
    with sessions(settings)() as s:
        rows = [{"name": a.name, "role": str(a.role), "created_at": iso(a.created_at)} for a in list_users(s)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "role", "created_at"])
    return ExitCode.OK

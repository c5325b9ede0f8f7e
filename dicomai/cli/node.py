"""``dicomai serve`` and ``dicomai echo``: the node itself and a C-ECHO to a peer."""

from __future__ import annotations

import argparse

from dicomai.cli import ExitCode, Subparsers
from dicomai.config import NodeConfig, Settings
from dicomai.errors import UsageError

__all__ = ["cmd_echo", "cmd_serve", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``echo``."""
    serve = subparsers.add_parser("serve", parents=[common], help="run the DICOM node in the foreground")
    serve.add_argument("--host", help=f"listen address (node.host, default: {_default('host')})")
    serve.add_argument("--port", type=int, help=f"listen port (node.port, default: {_default('port')})")
    serve.add_argument("--ae-title", help=f"own AE title (node.ae_title, default: {_default('ae_title')})")
    serve.set_defaults(func=cmd_serve)

    echo = subparsers.add_parser("echo", parents=[common], help="C-ECHO a configured or given peer")
    echo.add_argument("destination", nargs="?", help="name of a [[destinations]] entry")
    echo.add_argument("--host", help="the peer's address (instead of a destination)")
    echo.add_argument("--port", type=int, help="the peer's port")
    echo.add_argument("--ae-title", help="the peer's AE title (default: ANY-SCP)")
    echo.set_defaults(func=cmd_echo)


def _default(key: str) -> object:
    """The embedded default of ``node.<key>``, for the help text."""
    return NodeConfig.model_fields[key].default


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the node until it is stopped."""
    from dicomai.node import run_node

    return run_node(settings)


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """C-ECHO a ``[[destinations]]`` entry (over TLS when it says so) or a host and port; 1 unless
    the peer answers 0x0000. The same check as ``dicomai check`` runs for each destination."""
    from dicomai.config import Destination
    from dicomai.ops.checks import check_destination

    if args.destination:
        dest = settings.destination(args.destination)
    else:
        if not (args.host and args.port):
            raise UsageError("echo: give a destination name or --host and --port")
        dest = Destination(name="command line", ae_title=args.ae_title or "ANY-SCP", host=args.host,
                           port=args.port)
    result = check_destination(settings, dest)
    print(result.detail.replace("C-ECHO ", "echo ", 1))
    return ExitCode.OK if result.ok else ExitCode.FAILURE

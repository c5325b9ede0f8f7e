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
    """C-ECHO a ``[[destinations]]`` entry or a host and port; 1 unless the peer answers 0x0000."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    if args.destination:
        d = settings.destination(args.destination)
        host, port, aet = d.host, d.port, d.ae_title
    else:
        if not (args.host and args.port):
            raise UsageError("echo: give a destination name or --host and --port")
        host, port, aet = args.host, args.port, args.ae_title or "ANY-SCP"
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = settings.node.acse_timeout_s
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"echo {aet}@{host}:{port}: association {'rejected' if assoc.is_rejected else 'failed'}")
        return ExitCode.FAILURE
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    print(f"echo {aet}@{host}:{port}: status 0x{code:04X}" if code >= 0 else "echo: no response")
    return ExitCode.OK if code == 0 else ExitCode.FAILURE

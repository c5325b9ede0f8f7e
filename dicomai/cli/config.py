"""``dicomai config show``: the effective configuration."""

from __future__ import annotations

import argparse
import json

from dicomai.cli import ExitCode, Subparsers, json_flag
from dicomai.config import Settings, masked

__all__ = ["cmd_config_show", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``config show``."""
    config = subparsers.add_parser("config", parents=[common], help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cshow = csub.add_parser("show", parents=[common], help="effective configuration (secrets masked)")
    json_flag(cshow)
    cshow.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the settings after file, environment and flags, as TOML-like text or JSON."""
    data = masked(settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return ExitCode.OK
    for section, values in data.items():
        if isinstance(values, dict):
            print(f"[{section}]")
            for k, v in values.items():
                print(f"{k} = {json.dumps(v)}")
            print()
        else:
            print(f"{section} = {json.dumps(values)}")
    return ExitCode.OK

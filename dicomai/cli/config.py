"""``dicomai config show``: the effective configuration, as TOML that loads back."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from dicomai.cli import ExitCode, Subparsers, json_flag
from dicomai.config import Settings, mask_url, masked

if TYPE_CHECKING:
    from dicomai.model.package import Manifest

__all__ = ["cmd_config_show", "register", "to_toml"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``config show``."""
    config = subparsers.add_parser("config", parents=[common], help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cshow = csub.add_parser("show", parents=[common], help="effective configuration (secrets masked)")
    json_flag(cshow)
    cshow.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the settings after file, environment and flags: TOML (``--config`` reads it) or JSON."""
    data = masked(settings)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(to_toml(data, _notes(settings)), end="")
    return ExitCode.OK


def _notes(settings: Settings) -> dict[str, str]:
    """Comments for the keys whose value means "look elsewhere": what is used instead."""
    notes = {}
    if not settings.database.url:
        notes["database.url"] = f"empty: SQLite, {mask_url(settings.database_url)}"
    manifest = _model_manifest(settings)
    if settings.model.path is None:
        notes["model.path"] = ("the model shipped with dicomai" if manifest is not None
                               else "no model installed (images are recorded not_analysed)")
    for key in ("high_sensitivity", "high_specificity"):
        if getattr(settings.model, key) is None:
            value = getattr(manifest.operating_points, key) if manifest is not None else None
            notes[f"model.{key}"] = f"the model's, {value:.3f}" if value is not None else "the model's"
    if not settings.scope.body_parts:
        names = ", ".join(manifest.body_parts) if manifest is not None else ""
        notes["scope.body_parts"] = (f"empty: the model's own list, {names}" if names
                                     else "empty: the model's own list")
    return notes


def _model_manifest(settings: Settings) -> Manifest | None:
    """The configured package's manifest, or ``None`` when there is none or it cannot be read."""
    from dicomai.model.package import ModelError, load_package
    from dicomai.node import default_model_dir

    path = settings.model.path or default_model_dir()
    if path is None:
        return None
    try:
        return load_package(path, check_hash=False).manifest
    except (ModelError, OSError, ValueError):
        return None  # `config show` describes the settings; `model verify` checks the package


def _value(value: Any) -> str:
    """One TOML value (the settings hold strings, numbers, booleans, lists and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _pairs(prefix: str, values: dict[str, Any], notes: dict[str, str]) -> list[str]:
    lines = []
    for key, value in values.items():
        note = notes.get(f"{prefix}{key}")
        if value is None:  # TOML has no null: an unset key is left out
            lines.append(f"# {key} unset" + (f": {note}" if note else ""))
        else:
            lines.append(f"{key} = {_value(value)}" + (f"  # {note}" if note else ""))
    return lines


def to_toml(data: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    """``data`` (sections of keys, and arrays of tables) as TOML, ``notes`` as trailing comments.

    Each section's keys follow its own ``[section]`` header and arrays of tables come last, so
    the text loads back to the same values.
    """
    notes = notes or {}
    lines: list[str] = []
    arrays: list[tuple[str, list[Any]]] = []
    for name, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{name}]", *_pairs(f"{name}.", value, notes), ""]
        elif isinstance(value, list):
            arrays.append((name, value))
        else:
            raise TypeError(f"top-level key {name!r} is neither a section nor a list of tables")
    for name, items in arrays:
        if not items:
            lines += [f"# no [[{name}]]", ""]
        for item in items:
            lines += [f"[[{name}]]", *_pairs(f"{name}.", item, notes), ""]
    return "\n".join(lines)

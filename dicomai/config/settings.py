"""The settings object, and loading it from flags, environment and file (see the package)."""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicomai.config.sections import (
    AccessConfig,
    DatabaseConfig,
    LoggingConfig,
    ModelConfig,
    NodeConfig,
    ScopeConfig,
    StorageConfig,
    StudiesConfig,
)
from dicomai.config.services import (
    Destination,
    HttpConfig,
    OutboxConfig,
    ResultsConfig,
    RetentionConfig,
    TlsConfig,
    WebConfig,
)
from dicomai.errors import ConfigError

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "SYSTEM_CONFIG", "Settings", "find_config", "load_settings",
           "mask_url", "masked"]

ENV_PREFIX = "DICOMAI_"
#: The variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = "DICOMAI_CONFIG"
#: The file every command reads when neither ``--config`` nor ``DICOMAI_CONFIG`` names one.
SYSTEM_CONFIG = Path("/etc/dicomai/dicomai.toml")


class Settings(BaseModel):
    """Effective configuration of one dicomai process (built by :func:`load_settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeConfig = Field(default_factory=NodeConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    studies: StudiesConfig = Field(default_factory=StudiesConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    scope: ScopeConfig = Field(default_factory=ScopeConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    destinations: list[Destination] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return self

    @model_validator(mode="after")
    def _tls_port(self) -> Settings:
        if self.tls.enabled and self.tls.plain and self.tls.port == self.node.port:
            raise ValueError("tls.port must differ from node.port while tls.plain is true")
        return self

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_dir / 'audit.sqlite3'}"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError("destinations", f"no destination named {name!r}")


def find_config(given: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The configuration file a command reads, and what named it.

    ``given`` (``--config``), else ``DICOMAI_CONFIG``, else :data:`SYSTEM_CONFIG` when it
    exists, else none (the embedded defaults).
    """
    if given is not None:
        return given, "--config"
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), CONFIG_ENV
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG, "the default location"
    return None, "no file"


def _is_complex(annotation: Any) -> bool:
    """Whether a field's value is given as JSON in an environment variable (a list, a table)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_complex(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, dict, tuple, set):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The settings given as ``DICOMAI_<SECTION>__<KEY>`` (or a whole ``DICOMAI_<SECTION>``).

    Other ``DICOMAI_*`` variables (``DICOMAI_CONFIG``, those of the training tools or of the
    tests) are not settings and are left alone. Returns the nested values and, per key path,
    the variable that gave it.
    """
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    sections = Settings.model_fields
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) == 1:
            if parts[0] not in sections:
                continue  # DICOMAI_CONFIG, DICOMAI_MOBILENET_V2_TFLITE, ...: not a setting
            annotation = sections[parts[0]].annotation
        elif len(parts) == 2:
            section = sections.get(parts[0])
            model = section.annotation if section is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError(name, "unknown setting (expected DICOMAI_<SECTION>__<KEY>, "
                                  f"sections: {', '.join(_section_names())})")
            if parts[1] not in model.model_fields:
                raise ConfigError(name, f"unknown key {parts[1]!r} in section [{parts[0]}]")
            annotation = model.model_fields[parts[1]].annotation
        else:
            raise ConfigError(name, "too many '__' separators (expected DICOMAI_<SECTION>__<KEY>)")
        value: Any = raw
        if _is_complex(annotation):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(name, f"not valid JSON ({exc.msg}); lists and tables are "
                                  "given as JSON, e.g. '[\"sc\", \"sr\"]'") from None
        if len(parts) == 1:
            data[parts[0]] = _merge(data.get(parts[0]), value)
        else:
            data.setdefault(parts[0], {})[parts[1]] = value
        origin[tuple(parts)] = name
    return data, origin


def _section_names() -> list[str]:
    return [name for name, f in Settings.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]


def _merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: tables merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(top, dict):
        merged = dict(base)
        for key, value in top.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    return top


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's tables; ConfigError for a file that is missing, unreadable or not TOML."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(str(path), "cannot read the configuration file (permission denied "
                          f"for user id {os.geteuid()}; see its owner, group and mode)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration file ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def _has(data: Any, loc: tuple[str | int, ...]) -> bool:
    for part in loc:
        found = (isinstance(data, dict) and part in data
                 or isinstance(data, list) and isinstance(part, int) and part < len(data))
        if not found:
            return False
        data = data[part]
    return True


def _source(loc: tuple[str | int, ...], overrides: dict[str, Any], env_origin: dict[tuple[str, ...], str],
            file_data: dict[str, Any], path: Path | None) -> str | None:
    """Where the value at ``loc`` came from, in the order the layers win."""
    if _has(overrides, loc[:2]):
        return "the command line"
    for n in (2, 1):
        name = env_origin.get(tuple(str(p) for p in loc[:n]))
        if name is not None:
            return f"environment variable {name}"
    if path is not None and _has(file_data, loc[:2]):
        return str(path)
    return None


def load_settings(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build and validate the effective configuration.

    Parameters
    ----------
    path:
        TOML file, or ``None`` for embedded defaults only (see :func:`find_config`).
    overrides:
        Values from command-line flags, nested by section (``{"node": {"port": 104}}``).
    environ:
        Environment to read ``DICOMAI_<SECTION>__<KEY>`` variables from (default
        ``os.environ``, which is only read).

    Raises
    ------
    ConfigError
        Naming the first bad key or value and where it came from.
    """
    env_data, env_origin = _env_layer(os.environ if environ is None else environ)
    file_data = _read_toml(path) if path is not None else {}
    flags = overrides or {}
    data = _merge(_merge(file_data, env_data), flags)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(first["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        raise ConfigError(key, message, _source(loc, flags, env_origin, file_data, path)) from None


def masked(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data with secrets (database password) masked."""
    data = settings.model_dump(mode="json")
    data["database"]["url"] = mask_url(data["database"]["url"])
    return data


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)

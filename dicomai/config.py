"""The one configuration object of the node.

Sources, highest priority first: command-line flags, ``DICOMAI_<SECTION>__<KEY>``
environment variables, the TOML file given with ``--config``, and the embedded defaults
(documented key by key in ``config/dicomai.toml``). Validation happens once, at start-up;
an unknown key or a bad value raises :class:`~dicomai.errors.ConfigError` naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicomai.errors import ConfigError

__all__ = [
    "AccessConfig",
    "AllowedCaller",
    "DatabaseConfig",
    "Destination",
    "HttpConfig",
    "LogFormat",
    "LoggingConfig",
    "ModelConfig",
    "NodeConfig",
    "OutboxConfig",
    "Output",
    "ResultsConfig",
    "ScopeConfig",
    "Settings",
    "StorageConfig",
    "StudiesConfig",
    "load_settings",
    "masked",
]

ENV_PREFIX = "DICOMAI_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default repertoire, no backslash


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII, no '\\')")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    """Identity and network settings of the DICOM listener."""

    ae_title: str = "DICOMAI"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("./dicomai-data")
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu_size: int = Field(65536, ge=0)
    max_object_mb: int = Field(1024, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]{1,253}$", value):
                raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
        return value


class AllowedCaller(_Section):
    """One calling AE title that may associate, optionally pinned to host addresses."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # raises ValueError with the bad value
        return values

    def permits(self, host: str) -> bool:
        """Whether a peer at ``host`` may use this AE title."""
        if not self.hosts:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(h, strict=False) for h in self.hosts)


class AccessConfig(_Section):
    """Who may associate with the node."""

    require_called_ae_title: bool = True
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)

    def check(self, calling_ae: str, host: str, called_ae: str, own_ae: str) -> str | None:
        """Return why an association must be rejected, or ``None`` to accept it."""
        if self.require_called_ae_title and called_ae.strip() != own_ae:
            return "called AE title not recognised"
        if not self.allowed_callers:
            return None
        entries = [c for c in self.allowed_callers if c.ae_title == calling_ae.strip()]
        if not entries:
            return "calling AE title not on the allow-list"
        if not any(c.permits(host) for c in entries):
            return "calling AE title not allowed from this host"
        return None


class StorageConfig(_Section):
    """The durable spool."""

    min_free_mb: int = Field(1024, ge=0)
    fsync: bool = True


class StudiesConfig(_Section):
    """When a study is considered complete."""

    quiet_period_s: float = Field(10.0, ge=0)
    poll_interval_s: float = Field(0.25, gt=0)
    # Stable earlier: once every association that brought the study's instances is released
    # and settle_s has passed (the quiet period still applies to associations left open).
    on_release: bool = True
    settle_s: float = Field(1.0, ge=0)


class DatabaseConfig(_Section):
    """The audit database; empty URL means SQLite inside the data directory."""

    url: str = ""
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("only sqlite:// and postgresql+psycopg:// URLs are supported")
        return value


class ModelConfig(_Section):
    """The fracture model and how inference runs."""

    path: Path | None = None  # None: the model shipped inside the package, if any
    threads: int = Field(0, ge=0)  # onnxruntime intra-op threads; 0 = one per core
    providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    high_sensitivity: float | None = Field(None, ge=0, le=1)  # override the manifest's thresholds
    high_specificity: float | None = Field(None, ge=0, le=1)


class ScopeConfig(_Section):
    """Which received images the model analyses; the rest is recorded as not_analysed."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    sop_classes: list[str] = Field(default_factory=lambda: [
        "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    ])
    body_parts: list[str] = Field(default_factory=list)  # empty: the model's own list
    analyse_unknown_body_part: bool = True
    min_size_px: int = Field(128, ge=1)


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class LoggingConfig(_Section):
    level: str = "info"
    format: LogFormat = LogFormat.AUTO

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return value.lower()


class Output(StrEnum):
    """Result objects the node can send."""

    SC = "sc"  # Secondary Capture with the Grad-CAM overlay, one per analysed image
    SR = "sr"  # Structured Report (TID 1500), one per study and run


class Destination(_Section):
    """A DICOM peer the node talks to: `dicomai echo NAME` and result delivery."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    outputs: list[Output] = Field(default_factory=lambda: [Output.SC, Output.SR])

    _ae = field_validator("ae_title")(_check_ae_title)


class ResultsConfig(_Section):
    """The DICOM result objects: what they look like and whether they are sent."""

    shadow: bool = False  # make, keep and audit the objects, send nothing
    # Kinds made and kept in data_dir/results even when no destination wants them, so a new
    # node shows its results (`studies show` lists them) before any PACS is configured.
    keep: list[Output] = Field(default_factory=lambda: [Output.SC, Output.SR])
    max_side: int = Field(2048, ge=256, le=8192)  # SC images larger than this are downscaled
    opacity: float = Field(0.45, ge=0, le=1)  # heat map weight where the map is at its maximum
    floor: float = Field(0.25, ge=0, lt=1)  # map values below this are not drawn


class OutboxConfig(_Section):
    """Delivery of result objects: retries, back-off, give-up age."""

    poll_interval_s: float = Field(2.0, gt=0)
    batch_size: int = Field(50, ge=1, le=10000)  # objects sent over one association
    initial_backoff_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(900.0, gt=0)
    max_age_h: float = Field(72.0, gt=0)  # then the object is dead (an admin may retry it)


class HttpConfig(_Section):
    """The operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback unless an admin binds it elsewhere on purpose
    port: int = Field(9102, ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _address(cls, value: str) -> str:
        ipaddress.ip_address(value)  # its ValueError names the bad value
        return value


class Settings(BaseSettings):
    """Effective configuration of one dicomai process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    node: NodeConfig = NodeConfig()
    access: AccessConfig = AccessConfig()
    storage: StorageConfig = StorageConfig()
    studies: StudiesConfig = StudiesConfig()
    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    model: ModelConfig = ModelConfig()
    scope: ScopeConfig = ScopeConfig()
    results: ResultsConfig = ResultsConfig()
    outbox: OutboxConfig = OutboxConfig()
    http: HttpConfig = HttpConfig()
    destinations: list[Destination] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return self

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir.resolve()

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


def _check_env_keys(environ: dict[str, str]) -> None:
    """Reject ``DICOMAI_*`` variables that name no setting (pydantic ignores them)."""
    sections = Settings.model_fields
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name.startswith("DICOMAI_TEST_"):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        section = sections.get(parts[0])
        if section is None:
            raise ConfigError(name, "unknown setting (expected DICOMAI_<SECTION>__<KEY>)")
        if len(parts) == 2:
            model = section.annotation
            if (isinstance(model, type) and issubclass(model, BaseModel)
                    and parts[1] not in model.model_fields):
                raise ConfigError(name, f"unknown key {parts[1]!r} in section {parts[0]!r}")
        elif len(parts) > 2:
            raise ConfigError(name, "too many '__' separators")


def _format_validation_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problem(s))"
    return ConfigError(key, message)


def load_settings(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build and validate the effective configuration.

    Parameters
    ----------
    path:
        TOML file, or ``None`` for embedded defaults only.
    overrides:
        Values from command-line flags, nested by section (``{"node": {"port": 104}}``).
    environ:
        Environment to read ``DICOMAI_*`` variables from (default ``os.environ``).

    Raises
    ------
    ConfigError
        Naming the first bad key or value.
    """
    env = dict(os.environ if environ is None else environ)
    _check_env_keys(env)
    if path is not None:
        if not path.is_file():
            raise ConfigError(str(path), "configuration file not found")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    saved = dict(os.environ)
    try:
        if environ is not None:
            os.environ.clear()
            os.environ.update(env)
        return _Loaded(**(overrides or {}))
    except ValidationError as exc:
        raise _format_validation_error(exc) from None
    finally:
        if environ is not None:
            os.environ.clear()
            os.environ.update(saved)


def masked(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data with secrets (database password) masked."""
    data = settings.model_dump(mode="json")
    url = data["database"]["url"]
    if url:
        data["database"]["url"] = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
    data["node"]["data_dir"] = str(settings.data_dir)
    data["database"]["effective_url"] = re.sub(
        r"(://[^:/@]+:)[^@]*@", r"\1***@", settings.database_url
    )
    return data

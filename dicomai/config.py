"""The one configuration object of the node.

Sources, highest priority first: command-line flags, ``DICOMAI_<SECTION>__<KEY>``
environment variables, the TOML file (``--config FILE``, else ``DICOMAI_CONFIG``, else
``/etc/dicomai/dicomai.toml`` when it exists: :func:`find_config`), and the embedded
defaults (documented key by key in ``config/dicomai.toml``). Validation happens once, at
start-up; an unknown key or a bad value raises :class:`~dicomai.errors.ConfigError` naming
it and where it came from. Loading reads the environment it is given and changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomai.errors import ConfigError

__all__ = [
    "AccessConfig",
    "AllowedCaller",
    "ClientCertificates",
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
    "RetentionConfig",
    "ScopeConfig",
    "Settings",
    "StorageConfig",
    "StudiesConfig",
    "TlsConfig",
    "WebConfig",
    "find_config",
    "load_settings",
    "mask_url",
    "masked",
]

ENV_PREFIX = "DICOMAI_"
#: The variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = "DICOMAI_CONFIG"
#: The file every command reads when neither ``--config`` nor ``DICOMAI_CONFIG`` names one.
SYSTEM_CONFIG = Path("/etc/dicomai/dicomai.toml")
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
    data_dir: Path = Field(Path("./dicomai-data"), validate_default=True)  # made absolute at load
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu_size: int = Field(65536, ge=0)
    max_object_mb: int = Field(1024, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Once, at load: every command run from another directory then still means the same
        # folder, and `config show` prints the folder that is used.
        return value.expanduser().resolve()

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]{1,253}$", value):
                raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
        return value


def subject_key(value: str) -> frozenset[tuple[str, str]]:
    """A certificate subject written ``"CN=modality1, O=Hospital"`` as a comparable set.

    Attribute names are case-insensitive and the order of the attributes does not matter
    (OpenSSL prints them in the certificate's order, RFC 4514 in the reverse one); values
    are compared as written. Raises ValueError for a part that is not ``NAME=value``.
    """
    pairs = set()
    for part in value.split(","):
        name, sep, text = part.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ValueError(f"{value!r} is not a subject like \"CN=modality1, O=Hospital\"")
        pairs.add((name.strip().upper(), text.strip()))
    return frozenset(pairs)


class AllowedCaller(_Section):
    """One calling AE title that may associate, optionally pinned to host addresses and to
    the subject of the client certificate it presents over DICOM TLS."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)
    # Set: the caller must come over the TLS port with a certificate of exactly this subject.
    cert_subject: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("cert_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            subject_key(value)  # raises ValueError naming the bad value
        return value

    def presents(self, cert_subject: str | None) -> bool:
        """Whether a peer that presented a certificate of ``cert_subject`` may use this entry."""
        if self.cert_subject is None:
            return True
        return cert_subject is not None and subject_key(cert_subject) == subject_key(self.cert_subject)

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

    def check(self, calling_ae: str, host: str, called_ae: str, own_ae: str,
              cert_subject: str | None = None) -> str | None:
        """Return why an association must be rejected, or ``None`` to accept it.

        ``cert_subject`` is the subject of the client certificate the peer presented over
        DICOM TLS (None over plain TCP or without a certificate).
        """
        if self.require_called_ae_title and called_ae.strip() != own_ae:
            return "called AE title not recognised"
        if not self.allowed_callers:
            return None
        entries = [c for c in self.allowed_callers if c.ae_title == calling_ae.strip()]
        if not entries:
            return "calling AE title not on the allow-list"
        if not any(c.permits(host) for c in entries):
            return "calling AE title not allowed from this host"
        if not any(c.permits(host) and c.presents(cert_subject) for c in entries):
            return "calling AE title not allowed with this client certificate"
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
    GSPS = "gsps"  # Grayscale Softcopy Presentation State outlining the finding, per analysed image
    KOS = "kos"  # Key Object Selection flagging a positive study's positive images


class ScStyle(StrEnum):
    """How the Secondary Capture shows the finding."""

    OUTLINE = "outline"  # the hotspot box and the map's contour, the bone left visible
    HEATMAP = "heatmap"  # the heat map blended over the radiograph


class Destination(_Section):
    """A DICOM peer the node talks to: `dicomai echo NAME` and result delivery."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    outputs: list[Output] = Field(default_factory=lambda: [Output.SC, Output.SR])
    # DICOM TLS to this peer: its certificate is verified against ca_certificates (the system's
    # CAs when unset) and must name server_name (the host when unset).
    tls: bool = False
    ca_certificates: Path | None = None
    client_certificate: Path | None = None  # with client_key: what the node presents
    client_key: Path | None = None
    server_name: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _client_pair(self) -> Destination:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")
        if not self.tls and (self.ca_certificates or self.client_certificate or self.server_name):
            raise ValueError("ca_certificates, client_certificate, client_key and server_name "
                             "need tls = true")
        return self

    @property
    def tls_server_name(self) -> str:
        """The name the peer's certificate must carry."""
        return self.server_name or self.host


class ResultsConfig(_Section):
    """The DICOM result objects: what they look like and whether they are sent."""

    shadow: bool = False  # make, keep and audit the objects, send nothing
    # Kinds made and kept in data_dir/results even when no destination wants them, so a new
    # node shows its results (`studies show` lists them) before any PACS is configured.
    keep: list[Output] = Field(default_factory=lambda: [Output.SC, Output.SR, Output.GSPS])
    max_side: int = Field(2048, ge=256, le=8192)  # SC images larger than this are downscaled
    opacity: float = Field(0.45, ge=0, le=1)  # heat map weight where the map is at its maximum
    floor: float = Field(0.25, ge=0, lt=1)  # map values below this are not drawn
    sc_style: ScStyle = ScStyle.OUTLINE


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


def _ip_address(value: str) -> str:
    ipaddress.ip_address(value)  # its ValueError names the bad value
    return value


class WebConfig(_Section):
    """The web console for admins and radiologists (:mod:`dicomai.web`); off unless enabled."""

    enabled: bool = False  # it serves patient data: an admin turns it on after adding a user
    host: str = "127.0.0.1"  # loopback unless an admin binds it elsewhere on purpose
    port: int = Field(9103, ge=1, le=65535)
    session_idle_min: float = Field(60.0, gt=0)  # a session unused this long is over
    session_max_h: float = Field(12.0, gt=0)  # and any session after this long
    max_login_failures: int = Field(5, ge=1)  # per user name and address in 15 minutes

    _address = field_validator("host")(_ip_address)


class RetentionConfig(_Section):
    """How long files are kept once their study is finished, and the disk-pressure purge.

    A study's files may go once it is processed (or failed) and none of its results waits in
    the outbox; the days count from the later of the two. The rows stay, saying when and why
    the file went. 0 days keeps that kind of file forever.
    """

    instances_days: float = Field(30.0, ge=0)  # received instances (spool/)
    results_days: float = Field(30.0, ge=0)  # SC and SR objects the node made (results/)
    maps_days: float = Field(30.0, ge=0)  # Grad-CAM maps (results/*.gradcam.npz)
    quarantine_days: float = Field(30.0, ge=0)  # rejected objects, from their arrival
    high_watermark_pct: float = Field(90.0, ge=0, le=100)  # 0 turns the disk-pressure purge off
    low_watermark_pct: float = Field(80.0, ge=0, le=100)
    interval_min: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _watermarks(self) -> RetentionConfig:
        if self.high_watermark_pct and self.low_watermark_pct >= self.high_watermark_pct:
            raise ValueError("low_watermark_pct must be below high_watermark_pct")
        return self


class ClientCertificates(StrEnum):
    """Whether callers on the TLS port must present a certificate signed by a trusted CA."""

    REQUIRED = "required"  # no certificate, no association (the handshake fails)
    OPTIONAL = "optional"  # verified when presented; access.allowed_callers decide the rest
    NONE = "none"  # not asked for: encryption only


class TlsConfig(_Section):
    """DICOM TLS on a port of its own (PS3.15 Annex B, BCP 195: TLS 1.2 or later)."""

    enabled: bool = False
    port: int = Field(2762, ge=1, le=65535)  # IANA's dicom-tls port
    plain: bool = True  # node.port keeps serving plain DICOM; false: TLS only
    certificate: Path | None = None  # PEM, the node's certificate (and its chain)
    private_key: Path | None = None  # PEM, unencrypted, readable by the service user only
    ca_certificates: Path | None = None  # PEM bundle of the CAs that sign callers' certificates
    client_certificates: ClientCertificates = ClientCertificates.REQUIRED
    # Start even when a private key (this one or a destination's client_key) is readable by
    # group or others: for file systems without Unix modes only.
    allow_loose_key_permissions: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsConfig:
        if not self.enabled:
            return self
        if self.certificate is None or self.private_key is None:
            raise ValueError("enabled needs certificate and private_key")
        if self.client_certificates is not ClientCertificates.NONE and self.ca_certificates is None:
            raise ValueError(f"client_certificates = {self.client_certificates.value!r} needs "
                             "ca_certificates (the CAs that sign the callers' certificates)")
        return self


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

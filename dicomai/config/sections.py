"""Sections of the configuration for receiving and keeping: the node and its access rules,
storage, studies, the audit database, the model, the scope and logging."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from dicomai.analysis.bodyparts import KNOWN_BODY_PARTS, defined_term

__all__ = [
    "AccessConfig",
    "AllowedCaller",
    "DatabaseConfig",
    "LogFormat",
    "LoggingConfig",
    "ModelConfig",
    "NodeConfig",
    "ScopeConfig",
    "StorageConfig",
    "StudiesConfig",
    "subject_key",
]

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
    # The drift watch (/metrics, and a warning in the log every drift_check_min) looks at the
    # images of the last drift_window_days.
    drift_window_days: float = Field(30.0, gt=0)
    drift_check_min: float = Field(60.0, gt=0)


class ScopeConfig(_Section):
    """Which received images the model analyses; the rest is recorded as not_analysed."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    sop_classes: list[str] = Field(default_factory=lambda: [
        "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    ])
    body_parts: list[str] = Field(default_factory=list)  # empty: the model's own list
    # A site's own Body Part Examined spellings and the defined terms they mean
    # ({"SCHULTER" = "SHOULDER"}): judged, graded and calibrated as that term.
    body_part_aliases: dict[str, str] = Field(default_factory=dict)
    # A value that is no defined term and names none in its words ("SCHULTER"): refused unless set.
    analyse_unknown_body_part: bool = False
    # An empty or absent Body Part Examined, common on CR and DX.
    analyse_empty_body_part: bool = True
    min_size_px: int = Field(128, ge=1)

    @field_validator("body_part_aliases")
    @classmethod
    def _aliases_name_defined_terms(cls, aliases: dict[str, str]) -> dict[str, str]:
        terms = {defined_term(k): defined_term(v) for k, v in aliases.items()}
        unknown = sorted(v for v in terms.values() if v not in KNOWN_BODY_PARTS)
        if unknown:
            raise ValueError(f"not DICOM defined terms of Body Part Examined: {', '.join(unknown)}")
        return terms

    @model_validator(mode="before")
    @classmethod
    def _strict_configurations_stay_strict(cls, data: Any) -> Any:
        # An explicit analyse_unknown_body_part = false refuses empty values too unless
        # analyse_empty_body_part is given: a strict configuration stays strict.
        given = data if isinstance(data, dict) else {}
        if "analyse_unknown_body_part" in given and "analyse_empty_body_part" not in given:
            try:
                strict = not TypeAdapter(bool).validate_python(data["analyse_unknown_body_part"])
            except ValidationError:
                return data  # the field's own validation reports it
            if strict:
                return {**data, "analyse_empty_body_part": False}
        return data


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

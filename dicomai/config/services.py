"""Sections of the configuration for what the node gives back and serves: result objects,
destinations and the outbox, the operations endpoint, the web console, retention and TLS."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from dicomai.config.sections import _check_ae_title, _Section

__all__ = [
    "ClientCertificates",
    "Destination",
    "HttpConfig",
    "OutboxConfig",
    "Output",
    "ResultsConfig",
    "RetentionConfig",
    "ScStyle",
    "TlsConfig",
    "WebConfig",
]


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
    # SCs kept JPEG-LS lossless; sent so to a destination that accepts it, else decompressed.
    sc_compress: bool = True
    # A study with nothing in scope still gets an SR saying so, telling "not analysed" from
    # "still pending" in the PACS.
    not_analysed_sr: bool = True


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

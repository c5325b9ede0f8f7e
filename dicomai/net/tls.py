"""DICOM TLS with the standard library's :mod:`ssl`: contexts, keys and certificates.

The listener's context (:func:`server_context`) and a destination's (:func:`client_context`)
follow BCP 195 as PS3.15 Annex B asks: TLS 1.2 or later, the standard library's default cipher
suites (forward secret AEAD only, no RC4/3DES/export, OpenSSL security level 2), no
compression, no renegotiation. Neither trusts the system's CAs for callers: only the CAs an
admin names.

The server context does not handshake in pynetdicom's accept loop (one silent peer would
stall every other connection there); the guard (:mod:`dicomai.net.guard`) does it in the
association's own thread, under ``node.acse_timeout_s``.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomai.config import ClientCertificates, Destination, Settings, TlsConfig
from dicomai.errors import ConfigError

__all__ = [
    "Certificate",
    "check_key_permissions",
    "client_context",
    "loose_key_mode",
    "read_certificates",
    "server_context",
    "subject_text",
]

_VERIFY = {
    ClientCertificates.REQUIRED: ssl.CERT_REQUIRED,
    ClientCertificates.OPTIONAL: ssl.CERT_OPTIONAL,
    ClientCertificates.NONE: ssl.CERT_NONE,
}
#: OpenSSL's long attribute names (as :meth:`ssl.SSLSocket.getpeercert` gives them) to the
#: short ones of RFC 4514 that admins write in ``cert_subject``.
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "domainComponent": "DC", "emailAddress": "emailAddress", "serialNumber": "serialNumber",
}


class _DeferredHandshake(ssl.SSLContext):
    """A server context whose sockets handshake when the guard says so, not on accept.

    pynetdicom wraps each accepted socket in its accept loop; with the default
    ``do_handshake_on_connect`` the handshake (and a peer that never sends a ClientHello)
    would block that loop for every other caller.
    """

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)


def loose_key_mode(path: Path) -> int | None:
    """The permission bits of ``path`` when group or others have any access, else None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o077 else None


def check_key_permissions(settings: Settings) -> None:
    """Refuse private keys others can read: the node's TLS key and destinations' client keys.

    Raises
    ------
    ConfigError
        Naming the key whose file is missing or open to group or others (exit code 2),
        unless ``tls.allow_loose_key_permissions``.
    """
    keys = [("tls.private_key", settings.tls.private_key)] if settings.tls.enabled else []
    keys += [(f"destinations.{d.name}.client_key", d.client_key)
             for d in settings.destinations if d.tls]
    for key, path in keys:
        if path is None:
            continue
        try:
            mode = loose_key_mode(path)
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from None
        if mode is not None and not settings.tls.allow_loose_key_permissions:
            raise ConfigError(key, f"{path} is open to group or others (mode {mode:04o}): "
                                   "chmod 600 it, owned by the service user (or set "
                                   "tls.allow_loose_key_permissions = true)")


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's context for the TLS port.

    Raises
    ------
    ConfigError
        When a certificate, key or CA file cannot be loaded (missing, not PEM, key not the
        certificate's).
    """
    assert tls.certificate is not None and tls.private_key is not None  # TlsConfig checks
    # The settings of ssl.create_default_context(Purpose.CLIENT_AUTH) without its
    # load_default_certs(): a caller is trusted through ca_certificates only.
    ctx = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.certificate", f"cannot load {tls.certificate} with key "
                                             f"{tls.private_key}: {_why(exc)}") from None
    ctx.verify_mode = _VERIFY[tls.client_certificates]
    if tls.ca_certificates is not None:
        _load_cas(ctx, tls.ca_certificates, "tls.ca_certificates")
    return ctx


def client_context(dest: Destination) -> ssl.SSLContext:
    """The context for associations with a TLS destination: the peer's certificate verified
    and matched against :attr:`Destination.tls_server_name`."""
    key = f"destinations.{dest.name}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if dest.ca_certificates is not None:
        _load_cas(ctx, dest.ca_certificates, f"{key}.ca_certificates")  # only these CAs
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if dest.client_certificate is not None and dest.client_key is not None:
        try:
            ctx.load_cert_chain(dest.client_certificate, dest.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key}.client_certificate",
                              f"cannot load {dest.client_certificate} with key {dest.client_key}: "
                              f"{_why(exc)}") from None
    return ctx


def _load_cas(ctx: ssl.SSLContext, path: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key, f"cannot load {path}: {_why(exc)}") from None


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    return exc.strerror or str(exc)


def subject_text(peer_cert: dict[str, Any] | None) -> str | None:
    """A verified peer certificate's subject as ``"CN=..., O=..."`` (None without one)."""
    if not peer_cert or "subject" not in peer_cert:
        return None
    parts = [f"{_SHORT_NAMES.get(name, name)}={value}"
             for rdn in peer_cert["subject"] for name, value in rdn]
    return ", ".join(parts) or None


@dataclass(frozen=True)
class Certificate:
    """The validity of one certificate in a PEM file."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_OID_NAMES = {"2.5.4.3": "CN", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.8": "ST",
              "2.5.4.7": "L", "0.9.2342.19200300.100.1.25": "DC"}


def read_certificates(path: Path) -> list[Certificate]:
    """Every certificate in the PEM file ``path`` with its subject and validity.

    Raises
    ------
    OSError
        When the file cannot be read.
    ValueError
        When it holds no certificate or one that is not DER inside.
    """
    blocks = _PEM.findall(path.read_bytes())
    if not blocks:
        raise ValueError("no PEM certificate in the file")
    return [_decode(base64.b64decode(b"".join(block.split()))) for block in blocks]


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: its tag, where its content starts and where it ends."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[at:at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        element = _tlv(der, start)
        out.append(element)
        start = element[2]
    return out


def _time(der: bytes, element: tuple[int, int, int]) -> dt.datetime:
    tag, start, end = element
    text = der[start:end].decode("ascii")
    fmt = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}.get(tag)
    if fmt is None:
        raise ValueError(f"validity time of tag 0x{tag:02X}")
    return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)


def _oid(raw: bytes) -> str:
    first, rest = divmod(raw[0], 40)
    parts, value = [str(min(first, 2)), str(rest if first < 2 else raw[0] - 80)], 0
    for byte in raw[1:]:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


def _name(der: bytes, start: int, end: int) -> str:
    parts = []
    for _, rdn_start, rdn_end in _children(der, start, end):
        for _, at_start, at_end in _children(der, rdn_start, rdn_end):
            (_, o_start, o_end), (_, v_start, v_end) = _children(der, at_start, at_end)[:2]
            oid = _oid(der[o_start:o_end])
            parts.append(f"{_OID_NAMES.get(oid, oid)}={der[v_start:v_end].decode('utf-8', 'replace')}")
    return ", ".join(parts)


def _decode(der: bytes) -> Certificate:
    """Subject and validity of a DER X.509 certificate (RFC 5280 4.1)."""
    try:
        _, cert_start, cert_end = _tlv(der, 0)
        _, tbs_start, tbs_end = _children(der, cert_start, cert_end)[0]
        fields = _children(der, tbs_start, tbs_end)
        if fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject
        _, v_start, v_end = fields[3]
        not_before, not_after = _children(der, v_start, v_end)
        _, s_start, s_end = fields[4]
        return Certificate(_name(der, s_start, s_end), _time(der, not_before), _time(der, not_after))
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not an X.509 certificate ({exc})") from None


"""Checks of what the node needs to take studies: database, model, disk, DICOM peers.

Each check returns a :class:`Check` instead of raising, so that a preflight reports every
broken item at once (``dicomai check``) and the readiness endpoint names the failing one.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dicomai.config import Destination, Settings

__all__ = ["CERT_FAIL_DAYS", "CERT_WARN_DAYS", "Check", "check_certificate", "check_database",
           "check_destination", "check_disk", "check_key", "check_model", "check_scope", "check_thresholds",
           "free_bytes"]

#: A certificate that ends within this many days fails the preflight: renew it now.
CERT_FAIL_DAYS = 14
#: Within this many days it is a warning (the check still passes).
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    """The outcome of one check: what was checked, whether it passed, and why.

    ``warn`` marks a check that passed but needs attention soon (a certificate near its end).
    """

    item: str
    ok: bool
    detail: str
    warn: bool = False


def check_database(engine: Engine) -> Check:
    """The audit database answers and is at the head revision of this dicomai."""
    from dicomai.store.db import current_revision, head_revision

    url = engine.url.render_as_string(hide_password=True)
    try:
        current = current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Check("database", False, f"cannot connect to {url}: {reason}")
    head = head_revision(engine)
    if current != head:
        return Check("database", False, f"{url} is at revision {current or 'base'}, this dicomai "
                                        f"needs {head}: run `dicomai db upgrade`")
    return Check("database", True, f"{url} at revision {head}")


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path``, or of its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(settings: Settings) -> Check:
    """The data directory's file system has more free space than ``storage.min_free_mb``."""
    free_mib = free_bytes(settings.data_dir) // 2**20
    floor = settings.storage.min_free_mb
    detail = f"{free_mib} MiB free on {settings.data_dir}, floor {floor} MiB (storage.min_free_mb)"
    return Check("disk", free_mib >= floor, detail)


def check_model(settings: Settings) -> Check:
    """The model package loads, matches its hash and runs one blank image."""
    import numpy as np

    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import ModelError, load_package
    from dicomai.node import default_model_dir

    path = settings.model.path or default_model_dir()
    if path is None:
        return Check("model", False, "no model package: set model.path (images would not be analysed)")
    try:
        package = load_package(path)
        clf = Classifier(package, threads=settings.model.threads, providers=settings.model.providers)
        (out,) = clf.predict([preprocess(np.zeros((300, 200), np.float32), package)])
    except ModelError as exc:
        return Check("model", False, str(exc))
    m = package.manifest
    return Check("model", True, f"{m.name} {m.version} ({path}); hash ok, test input -> "
                                f"{out.probability:.4f} on {', '.join(clf.providers)}")


def check_scope(settings: Settings) -> Check:
    """Which body parts the model analyses; a warning in the row when values the node cannot
    recognise are analysed too (``scope.analyse_unknown_body_part``, outside the validated scope)."""
    from dicomai.model.package import ModelError, load_package
    from dicomai.node import default_model_dir

    scope = settings.scope
    path = settings.model.path or default_model_dir()
    try:
        model_body_parts = load_package(path, check_hash=False).manifest.body_parts if path else []
    except ModelError as exc:
        return Check("scope", False, str(exc))
    parts = scope.body_parts or model_body_parts
    source = "scope.body_parts" if scope.body_parts else "the model's validated list"
    detail = (f"body parts from {source} ({len(parts)}); empty: "
              f"{'analysed' if scope.analyse_empty_body_part else 'not analysed'}")
    if scope.body_part_aliases:
        detail += f"; {len(scope.body_part_aliases)} site aliases"
    if scope.analyse_unknown_body_part:
        detail += ("; WARNING: values the node cannot recognise are analysed "
                   "(scope.analyse_unknown_body_part), outside the model's validated scope")
    else:
        detail += "; values the node cannot recognise: not analysed"
    return Check("scope", True, detail)


def check_thresholds(settings: Settings) -> Check:
    """The operating points the node will grade by, and where they come from; a site profile
    the node cannot read fails (it would stop the node at start)."""
    from dicomai.analysis.image import describe_thresholds
    from dicomai.model.package import ModelError, load_package
    from dicomai.model.profile import ProfileError
    from dicomai.node import default_model_dir

    path = settings.model.path or default_model_dir()
    if path is None:
        return Check("thresholds", False, "no model package")
    try:
        return Check("thresholds", True, describe_thresholds(settings, load_package(path, check_hash=False)))
    except (ModelError, ProfileError) as exc:
        return Check("thresholds", False, str(exc))


def check_destination(settings: Settings, dest: Destination) -> Check:
    """A C-ECHO to ``dest`` is answered with status 0x0000."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomai.errors import ConfigError
    from dicomai.net.sender import tls_args

    item, peer = f"destination {dest.name}", f"{dest.ae_title}@{dest.host}:{dest.port}"
    if dest.tls:
        peer += f" over TLS (server name {dest.tls_server_name})"
    try:
        tls = tls_args(dest)
    except ConfigError as exc:
        return Check(item, False, f"C-ECHO {peer}: {exc}")
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = settings.node.acse_timeout_s
    ae.connection_timeout = settings.node.acse_timeout_s
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        why = "rejected by the peer" if assoc.is_rejected else "failed (nothing listening or unreachable)"
        if tls is not None and not assoc.is_rejected:
            why = ("failed (nothing listening, or the TLS handshake failed: is the peer's "
                   f"certificate signed by ca_certificates and naming {dest.tls_server_name}?)")
        return Check(item, False, f"C-ECHO {peer}: association {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        return Check(item, False, f"C-ECHO {peer}: no response")
    return Check(item, code == 0, f"C-ECHO {peer}: status 0x{code:04X}")


def check_certificate(item: str, path: Path, now: dt.datetime | None = None) -> Check:
    """Every certificate in the PEM file ``path`` is valid now and for the weeks ahead.

    FAIL when one has expired, is not valid yet, or ends within :data:`CERT_FAIL_DAYS`;
    passed with a warning within :data:`CERT_WARN_DAYS`.
    """
    from dicomai.net.tls import read_certificates

    now = now or dt.datetime.now(dt.UTC)
    try:
        certs = read_certificates(path)
    except (OSError, ValueError) as exc:
        return Check(item, False, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    for cert in certs:
        if cert.not_after <= now:
            return Check(item, False, f"{path}: {cert.subject} expired on "
                                      f"{cert.not_after:%Y-%m-%d %H:%M} UTC")
        if cert.not_before > now:
            return Check(item, False, f"{path}: {cert.subject} not valid before "
                                      f"{cert.not_before:%Y-%m-%d %H:%M} UTC")
    first = min(certs, key=lambda c: c.not_after)
    days = first.days_left(now)
    detail = f"{path}: {first.subject} until {first.not_after:%Y-%m-%d}, {days:.0f} days left"
    if days < CERT_FAIL_DAYS:
        return Check(item, False, f"{detail} (under {CERT_FAIL_DAYS}: renew it now)")
    return Check(item, True, detail, warn=days < CERT_WARN_DAYS)


def check_key(item: str, path: Path, allow_loose: bool) -> Check:
    """The private key file exists and only its owner may read it."""
    from dicomai.net.tls import loose_key_mode

    try:
        mode = loose_key_mode(path)
    except OSError as exc:
        return Check(item, False, f"cannot read {path}: {exc.strerror}")
    if mode is None:
        return Check(item, True, f"{path}: owner only")
    detail = f"{path}: open to group or others (mode {mode:04o}); chmod 600 it"
    return Check(item, allow_loose, detail + (" (allowed by tls.allow_loose_key_permissions)"
                                               if allow_loose else ""), warn=allow_loose)

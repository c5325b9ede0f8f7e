"""The site profile: operating points a site calibrated on its own cases (``dicomai calibrate``).

It lives beside the audit database as ``data_dir/site-profile.json`` and overrides the
manifest's operating points for the model it was calibrated with (matched by the ONNX
file's sha256); a profile made for another model is ignored, so a model update never runs
on thresholds chosen for its predecessor.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, ValidationError

from dicomai.analysis.bodyparts import defined_term
from dicomai.errors import DicomaiError
from dicomai.model.package import ModelPackage, OperatingPoints, StrictModel

__all__ = ["PROFILE_NAME", "BodyPartPoints", "ProfileError", "SiteProfile", "load_profile",
           "profile_for", "save_profile"]

PROFILE_NAME = "site-profile.json"


class ProfileError(DicomaiError):
    """The site profile cannot be read or is invalid."""

    exit_code = 2

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"site profile {path}: {message}")
        self.path = path


class BodyPartPoints(StrictModel):
    """Operating points of one body part whose own sample met the targets."""

    operating_points: OperatingPoints
    cases: int = Field(ge=0)
    positives: int = Field(ge=0)


class SiteProfile(StrictModel):
    """Who calibrated which model, when, on how many cases, and the thresholds it gave."""

    model_name: str
    model_version: str
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: dt.datetime
    by: str
    cases: int = Field(ge=0)
    positives: int = Field(ge=0)
    targets: dict[str, float | None]
    operating_points: OperatingPoints
    body_parts: dict[str, BodyPartPoints] = Field(default_factory=dict)
    figures: dict[str, Any] = Field(default_factory=dict)

    def points(self, body_part: str | None = None) -> OperatingPoints:
        """The body part's own points where it has them, else the site's."""
        own = self.body_parts.get(defined_term(body_part))
        return own.operating_points if own is not None else self.operating_points


def load_profile(data_dir: Path) -> SiteProfile | None:
    """The profile in ``data_dir``, or ``None`` when there is none.

    Raises
    ------
    ProfileError
        The file exists but is not a valid profile (never silently ignored).
    """
    path = data_dir / PROFILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProfileError(path, f"cannot read: {exc}") from None
    try:
        return SiteProfile.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ProfileError(path, f"not valid JSON: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ProfileError(path, f"{where}: {err['msg']}") from None


def profile_for(data_dir: Path, package: ModelPackage) -> SiteProfile | None:
    """The profile in ``data_dir`` if it was calibrated with this model package."""
    profile = load_profile(data_dir)
    if profile is not None and profile.model_sha256 != package.manifest.sha256:
        structlog.get_logger("dicomai.model").warning(
            "site_profile.ignored", reason="calibrated for another model",
            profile_model=f"{profile.model_name} {profile.model_version}",
            model=f"{package.manifest.name} {package.manifest.version}")
        return None
    return profile


def save_profile(profile: SiteProfile, data_dir: Path) -> Path:
    """Write the profile atomically (a node starting meanwhile reads the old or the new one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / PROFILE_NAME
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(profile.model_dump_json(indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

"""One radiograph in, one typed :class:`ImageAnalysis` out: scope, decode, display, classify.

Used by the node (a study's new images in turn, :mod:`dicomai.analysis.study`) and by
``dicomai classify`` (one file at a time), so both see the same pixels and the same rules.
Every failure of one image (an unreadable file, a header pydicom chokes on, pixels that do
not decode, a model error on that image) becomes that image's ``failed`` result with a short
reason; it never stops the other images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomai.analysis.bodyparts import body_part_term
from dicomai.analysis.scope import out_of_scope
from dicomai.config import ScopeConfig, Settings
from dicomai.imaging.gradcam import GradcamGrid
from dicomai.imaging.pixels import FloatImage, NormalizeError, Window, decode, to_display
from dicomai.imaging.stats import ImageStats, image_stats
from dicomai.model.classifier import Classifier, ModelInput, preprocess
from dicomai.model.grading import Grade, grade_image
from dicomai.model.package import ModelPackage, OperatingPoints
from dicomai.model.profile import load_profile, profile_for

__all__ = ["Analyser", "GradcamGrid", "ImageAnalysis", "Timings", "describe_thresholds", "operating_points",
           "points_in_force", "short_reason"]


def operating_points(settings: Settings, package: ModelPackage,
                     body_part: str | None = None) -> OperatingPoints:
    """The thresholds in force: configuration, else the site profile, else the manifest.

    The site profile (``dicomai calibrate``, ``data_dir/site-profile.json``) counts only for
    the model it was calibrated with; ``body_part`` picks its per-body-part points where it
    has them. A threshold set in the configuration is the admin's explicit choice and wins.
    """
    return points_in_force(settings, package)(body_part)


def points_in_force(settings: Settings, package: ModelPackage) -> Callable[[str | None], OperatingPoints]:
    """:func:`operating_points` for any body part, with the site profile read once (now)."""
    profile = profile_for(settings.data_dir, package)

    def points(body_part: str | None) -> OperatingPoints:
        term = body_part_term(body_part, settings.scope.body_part_aliases)  # "HAND RIGHT" is HAND's
        return _configured(settings, profile.points(term) if profile is not None
                           else package.manifest.operating_points)

    return points


def _configured(settings: Settings, base: OperatingPoints) -> OperatingPoints:
    """``base`` with the thresholds the configuration sets: the admin's explicit choice wins."""
    return OperatingPoints(
        high_sensitivity=(settings.model.high_sensitivity
                          if settings.model.high_sensitivity is not None else base.high_sensitivity),
        high_specificity=(settings.model.high_specificity
                          if settings.model.high_specificity is not None else base.high_specificity),
    )


def describe_thresholds(settings: Settings, package: ModelPackage) -> str:
    """The thresholds in force and where they come from, for an admin (``dicomai check``, the
    node's start): the site profile (who, when, on how many cases), else the model's."""
    stored = load_profile(settings.data_dir)  # once: profile_for would warn of another model's again
    profile = stored if stored is not None and stored.model_sha256 == package.manifest.sha256 else None
    points = _configured(settings, profile.operating_points if profile is not None
                         else package.manifest.operating_points)
    text = f"{points.high_sensitivity:.3f} / {points.high_specificity:.3f} (high sensitivity / specificity): "
    overridden = [f"model.{k}" for k in ("high_sensitivity", "high_specificity")
                  if getattr(settings.model, k) is not None]
    if profile is not None:
        text += (f"site profile by {profile.by} on {profile.created_at:%Y-%m-%d}, {profile.cases} cases "
                 f"({profile.positives} fractured)")
        if profile.body_parts and len(overridden) < 2:
            text += f"; own points for {', '.join(sorted(profile.body_parts))}"
    elif stored is not None:
        text += (f"site profile ignored: calibrated for another model ({stored.model_name} "
                 f"{stored.model_version}); the model's")
    else:
        text += "the model's (no site profile: calibrate before clinical use, dicomai calibrate)"
    if overridden:
        text += f"; {', '.join(overridden)} from the configuration"
    return text


def short_reason(what: str, exc: BaseException) -> str:
    """A one-line reason for an audit row: what failed, and the error's type and message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{what}: {type(exc).__name__}" + (f": {text[:200]}" if text else "")


@dataclass
class Timings:
    decode_ms: float | None = None
    normalize_ms: float | None = None
    infer_ms: float | None = None
    gradcam_ms: float | None = None


@dataclass
class ImageAnalysis:
    """What the analysis found for one image: a grade and probability, or why there is none."""

    grade: Grade
    probability: float | None = None
    reason: str | None = None
    # the image's header as read, without its pixel data (None when it could not be read)
    source: Dataset | None = None
    display: FloatImage | None = None  # the radiograph as displayed, analysed images only
    window: Window | None = None
    gradcam: GradcamGrid | None = None  # None when the model has no map or none was made
    points: OperatingPoints | None = None  # the thresholds the grade was given by
    stats: ImageStats | None = None  # for the drift watch, analysed images only
    timings: Timings = field(default_factory=Timings)

    @property
    def analysed(self) -> bool:
        return self.grade in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE)


def _drop_pixels(ds: Dataset) -> None:
    """Free an image's pixel data and pydicom's decoded copy of it. Everything after the
    analysis draws from the display image and reads only the header, and a study's images
    wait together for their results: two copies of each would stay in memory until then."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)


@dataclass
class _Candidate:
    analysis: ImageAnalysis
    model_input: ModelInput


class Analyser:
    """Scope rules, normalization and the model, applied to one image or a study's images."""

    def __init__(self, scope: ScopeConfig, package: ModelPackage, classifier: Classifier,
                 points: OperatingPoints,
                 points_for: Callable[[str | None], OperatingPoints] | None = None) -> None:
        """``points`` grade every image, unless ``points_for`` gives them per Body Part Examined
        (a site profile calibrated per body part, :func:`points_in_force`)."""
        self.scope = scope
        self.package = package
        self.classifier = classifier
        self.points = points
        self.points_for = points_for

    @classmethod
    def in_force(cls, settings: Settings, package: ModelPackage, classifier: Classifier) -> Analyser:
        """The analyser as the node runs it: the configured scope, and the thresholds in force
        for each Body Part Examined (:func:`points_in_force`, the site profile read once)."""
        points_for = points_in_force(settings, package)
        return cls(settings.scope, package, classifier, points_for(None), points_for=points_for)

    @staticmethod
    def read(path: Path) -> Dataset | str:
        """The data set at ``path``, or the reason it cannot be read."""
        try:
            return dcmread(path)
        except Exception as exc:  # noqa: BLE001 -- any parser failure is this image's reason
            return short_reason("cannot read the DICOM file", exc)

    def analyse(self, sources: Iterable[Dataset | str], apply_scope: bool = True) -> list[ImageAnalysis]:
        """Analyse images in turn: one result per source, in order (a ``str`` source is a read
        failure).

        Each data set keeps its header but loses its pixel data once it has been looked at
        (everything after the analysis draws from ``display``); given lazily, the sources'
        pixels are then in memory one image at a time.
        """
        results: list[ImageAnalysis] = []
        for source in sources:
            if isinstance(source, str):
                results.append(ImageAnalysis(Grade.FAILED, reason=source))
                continue
            result, model_input = self._prepare(source, apply_scope)
            _drop_pixels(source)
            results.append(result)
            if model_input is not None:
                self._infer(_Candidate(result, model_input))
        return results

    def analyse_display(self, display: FloatImage) -> ImageAnalysis:
        """Analyse an image given as displayed pixels (a PNG or JPEG radiograph)."""
        result = ImageAnalysis(Grade.FAILED, display=display)
        try:
            model_input = preprocess(display, self.package)
        except Exception as exc:  # noqa: BLE001 -- reported as this image's failure
            result.reason = short_reason("cannot prepare the image", exc)
            return result
        self._infer(_Candidate(result, model_input))
        return result

    def _prepare(self, ds: Dataset, apply_scope: bool) -> tuple[ImageAnalysis, ModelInput | None]:
        result = ImageAnalysis(Grade.FAILED, source=ds)
        t0 = time.perf_counter()
        try:
            if apply_scope:
                reason = out_of_scope(ds, self.scope, self.package.manifest.body_parts)
                if reason is not None:
                    result.grade, result.reason = Grade.NOT_ANALYSED, reason
                    return result, None
            stored = decode(ds)
            t1 = time.perf_counter()
            shown = to_display(ds, stored)
            model_input = preprocess(shown.image, self.package)
            t2 = time.perf_counter()
        except NormalizeError as exc:
            result.reason = str(exc)
            return result, None
        except Exception as exc:  # noqa: BLE001 -- a header or codec fault of this image only
            result.reason = short_reason("cannot decode the image", exc)
            return result, None
        result.window = shown.window
        result.display = shown.image
        result.stats = image_stats(ds, shown.image)
        result.timings = Timings(decode_ms=(t1 - t0) * 1e3, normalize_ms=(t2 - t1) * 1e3)
        return result, model_input

    def _infer(self, c: _Candidate) -> None:
        """One image through the model (one run each: see dicomai.model.classifier.MAX_BATCH)."""
        r = c.analysis
        t0 = time.perf_counter()
        try:
            (out,) = self.classifier.predict([c.model_input])
        except Exception as exc:  # noqa: BLE001 -- this image's failure, not the study's
            r.reason = short_reason("inference failed", exc)
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        points = self.points
        if self.points_for is not None:
            part = r.source.get("BodyPartExamined") if r.source is not None else None
            points = self.points_for(str(part) if part else None)
        try:
            grade = grade_image(out.probability, points)
        except ValueError as exc:  # a probability outside [0, 1]: the model misbehaved
            r.reason = short_reason("inference failed", exc)
            return
        r.probability, r.grade, r.points = out.probability, grade, points
        r.timings.infer_ms = infer_ms
        if out.gradcam is not None:
            r.gradcam = GradcamGrid(out.gradcam, c.model_input.geometry)

"""``dicomai calibrate``: a site's own operating points from its own labelled cases.

The cases come from a CSV, from radiologists' reads recorded with ``dicomai feedback``
(``--from-feedback``), or both. The CSV has a header and one case a row:

- ``path`` (a DICOM, PNG or JPEG file, relative to the CSV's folder) or ``study_uid``
  (a study the node graded: its recorded probability is used);
- ``label``: 1 fractured, 0 not;
- ``body_part`` (optional): overrides the DICOM Body Part Examined, names it for PNG/JPEG.

Files are scored by the node's own per-image analysis with its scope rules, so an image the
node would not analyse does not count. The thresholds reach the targets on the sample;
the sample must show them: the lower bound of the Wilson 95% interval of the achieved
sensitivity (specificity) must be at least the target minus ``--margin`` (0.05), else the
command refuses (exit 1) and writes nothing. A body part gets its own points where its own
cases meet the same rule. The result is written as ``data_dir/site-profile.json`` and an
audit event ``site.calibrated`` (who, when, how many cases, the thresholds); the node reads
the profile at start.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomai.analysis.bodyparts import body_part_term
from dicomai.cli import ExitCode, Subparsers, json_flag, sessions
from dicomai.cli.feedback import current_user
from dicomai.config import Settings

if TYPE_CHECKING:
    from dicomai.model.calibration import Calibration
    from dicomai.model.profile import SiteProfile

__all__ = ["Case", "cmd_calibrate", "read_cases", "register"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
OTHER_MODEL = "graded by another model"
#: The widest --margin: beyond it the refusal rule would accept samples that show little.
MAX_MARGIN = 0.1


@dataclass
class Case:
    """One labelled case; ``probability`` is filled in when it is scored or looked up."""

    source: str  # a file's path or a Study Instance UID
    is_study: bool
    label: bool
    body_part: str | None = None
    probability: float | None = None
    reason: str | None = None  # why it has no probability


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``calibrate``."""
    p = subparsers.add_parser("calibrate", parents=[common],
                              help="set the operating points from the site's own labelled cases")
    p.add_argument("csv", nargs="?", type=Path, metavar="CSV",
                   help="labelled cases: path or study_uid, label (0/1), optional body_part")
    p.add_argument("--from-feedback", action="store_true",
                   help="add the studies with a radiologist's read (dicomai feedback)")
    p.add_argument("--target-sensitivity", type=float, required=True, metavar="S",
                   help="sensitivity of the high-sensitivity point (the doubtful grade)")
    p.add_argument("--target-specificity", type=float, default=None, metavar="S",
                   help="specificity of the high-specificity point (the positive grade); "
                   "default: keep the threshold in force")
    p.add_argument("--margin", type=float, default=0.05,
                   help="how far below the target the Wilson 95%% lower bound may lie "
                   f"(0 to {MAX_MARGIN}; default 0.05)")
    p.add_argument("--by", default=None, metavar="NAME", help="who calibrates (default: the OS user)")
    json_flag(p)
    p.set_defaults(func=cmd_calibrate)


class CaseFileError(ValueError):
    """The CSV of cases is malformed (the message names the row)."""


def read_cases(path: Path) -> list[Case]:
    """The cases of a CSV (see the module docstring); file paths resolved against its folder."""
    cases: list[Case] = []
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        if "label" not in fields or not fields & {"path", "study_uid"}:
            raise CaseFileError(f"{path}: needs a header with label and path or study_uid")
        for n, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip()
            if label not in {"0", "1"}:
                raise CaseFileError(f"{path} line {n}: label must be 0 or 1, not {label!r}")
            file, uid = (row.get("path") or "").strip(), (row.get("study_uid") or "").strip()
            if bool(file) == bool(uid):
                raise CaseFileError(f"{path} line {n}: give either path or study_uid")
            part = str(row.get("body_part") or "").strip() or None  # read as the node reads it below
            source = uid or str((path.parent / file) if not Path(file).is_absolute() else Path(file))
            cases.append(Case(source, bool(uid), label == "1", part))
    return cases


def _score_files(cases: list[Case], settings: Settings) -> None:
    """Score the file cases with the node's own analysis and scope rules."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from dicomai.analysis.image import Analyser
    from dicomai.analysis.scope import body_part_reason
    from dicomai.cli.model import model_dir
    from dicomai.model.classifier import Classifier
    from dicomai.model.package import load_package

    files = [c for c in cases if not c.is_study]
    if not files:
        return
    package = load_package(model_dir(settings, None))
    classifier = Classifier(package, settings.model.threads, settings.model.providers)
    analyser = Analyser.in_force(settings, package, classifier)
    for n, case in enumerate(files, start=1):
        path = Path(case.source)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            # No header for the other scope rules; its listed body part must still be in scope.
            case.reason = body_part_reason(case.body_part, settings.scope, package.manifest.body_parts)
            if case.reason is not None:
                continue
            try:
                with Image.open(path) as im:
                    display = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                case.reason = f"cannot read the image: {exc}"
                continue
            result = analyser.analyse_display(display)
        else:
            source = analyser.read(path)
            if not isinstance(source, str) and case.body_part is None:
                case.body_part = str(source.get("BodyPartExamined") or "") or None
            result = analyser.analyse([source])[0]
        case.probability, case.reason = result.probability, result.reason
        if sys.stderr.isatty():
            sys.stderr.write(f"\rscored {n}/{len(files)}")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    pictures = sum(1 for c in files
                   if Path(c.source).suffix.lower() in IMAGE_SUFFIXES and c.probability is not None)
    if pictures:
        print(f"dicomai: note: {pictures} PNG/JPEG cases scored from their 8-bit grey pixels, not "
              "windowed as the node windows a DICOM image: their scores can differ from the node's; "
              "prefer DICOM files or study UIDs", file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    """Calibrate, write the site profile and its audit event; exit 1 when the sample is too small."""
    from dicomai.analysis.image import operating_points
    from dicomai.cli.model import model_dir
    from dicomai.model.calibration import calibrate_site
    from dicomai.model.package import OperatingPoints, load_package
    from dicomai.model.profile import BodyPartPoints, SiteProfile, save_profile
    from dicomai.store.feedback import record_calibration, reviewed_studies, study_scores

    for name in ("target_sensitivity", "target_specificity"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            print(f"dicomai: --{name.replace('_', '-')} must lie between 0 and 1", file=sys.stderr)
            return ExitCode.USAGE
    if not 0 <= args.margin <= MAX_MARGIN:
        print(f"dicomai: --margin must lie between 0 and {MAX_MARGIN}: the refusal rule is the "
              "one check that the sample shows the target", file=sys.stderr)
        return ExitCode.USAGE
    if args.csv is None and not args.from_feedback:
        print("dicomai: give a CSV of labelled cases, --from-feedback, or both", file=sys.stderr)
        return ExitCode.USAGE
    try:
        cases = read_cases(args.csv) if args.csv is not None else []
    except (OSError, CaseFileError) as exc:
        print(f"dicomai: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    maker = sessions(settings)  # the audit database must exist before any work is done
    package = load_package(model_dir(settings, None))
    with maker() as s:
        recorded = study_scores(s, [c.source for c in cases if c.is_study])
        reviewed = reviewed_studies(s) if args.from_feedback else []
    ours = package.manifest.sha256
    for c in cases:
        if c.is_study:
            score = recorded.get(c.source)
            if score is None:
                c.reason = "no graded study with this UID"
            elif score.model_sha256 != ours:
                c.reason = OTHER_MODEL
            else:
                c.probability = score.probability
                c.body_part = c.body_part or score.body_part
    listed = {c.source for c in cases if c.is_study}
    # A study graded by another model (before an upgrade) has that model's score: it says
    # nothing of this model's thresholds.
    cases += [Case(r.study_instance_uid, True, r.fractured, r.body_part,
                   r.probability if r.model_sha256 == ours else None,
                   None if r.model_sha256 == ours else OTHER_MODEL)
              for r in reviewed if r.study_instance_uid not in listed]
    _score_files(cases, settings)
    usable = [c for c in cases if c.probability is not None]
    left_out = Counter(c.reason or "no probability" for c in cases if c.probability is None)
    for reason, n in left_out.most_common():
        print(f"dicomai: left out: {n} case{'s' if n != 1 else ''}: {reason}", file=sys.stderr)
    current = operating_points(settings, package)
    try:
        result = calibrate_site([c.probability for c in usable if c.probability is not None],
                                [c.label for c in usable],
                                # "HAND RIGHT" and "Hand" are HAND, as the node looks its points up
                                [body_part_term(c.body_part, settings.scope.body_part_aliases) or None
                                 for c in usable],
                                args.target_sensitivity, args.target_specificity, args.margin,
                                ceiling=current.high_specificity)
    except ValueError as exc:
        print(f"dicomai: calibration refused, nothing written: {exc} "
              f"({len(usable)} usable cases of {len(cases)})", file=sys.stderr)
        return ExitCode.FAILURE

    def points(hs: float, hp: float | None) -> OperatingPoints:
        return OperatingPoints(high_sensitivity=hs,
                               high_specificity=hp if hp is not None else current.high_specificity)

    m = package.manifest
    by = args.by or current_user()
    overall = result.overall
    profile = SiteProfile(
        model_name=m.name, model_version=m.version, model_sha256=m.sha256,
        created_at=dt.datetime.now(dt.UTC), by=by, cases=overall.cases, positives=overall.positives,
        targets={"sensitivity": args.target_sensitivity, "specificity": args.target_specificity,
                 "margin": args.margin},
        operating_points=points(overall.high_sensitivity, overall.high_specificity),
        body_parts={part: BodyPartPoints(operating_points=points(c.high_sensitivity, c.high_specificity),
                                         cases=c.cases, positives=c.positives)
                    for part, c in result.body_parts.items()},
        figures={"overall": overall.as_dict(),
                 **{part: c.as_dict() for part, c in result.body_parts.items()},
                 "skipped_body_parts": result.skipped,
                 "unusable_cases": len(cases) - len(usable), "unusable_reasons": dict(left_out)},
    )
    path = save_profile(profile, settings.data_dir)
    with maker.begin() as s:
        record_calibration(s, by, {
            "profile": str(path), "model": f"{m.name} {m.version}", "model_sha256": m.sha256,
            "cases": overall.cases, "positives": overall.positives, "targets": profile.targets,
            "operating_points": profile.operating_points.model_dump(),
            "body_parts": {p: b.operating_points.model_dump() for p, b in profile.body_parts.items()}})
    if args.json:
        print(profile.model_dump_json(indent=2))
    else:
        _print(profile, overall, result.skipped, path)
    if settings.model.high_sensitivity is not None or settings.model.high_specificity is not None:
        print("dicomai: note: model.high_sensitivity/high_specificity in the configuration take "
              "precedence over the site profile", file=sys.stderr)
    return ExitCode.OK


def _print(profile: SiteProfile, overall: Calibration, skipped: dict[str, str], path: Path) -> None:
    op, at_hs, at_hp = profile.operating_points, overall.at_high_sensitivity, overall.at_high_specificity
    print(f"calibrated {profile.model_name} {profile.model_version} on {profile.cases} cases "
          f"({profile.positives} fractured) by {profile.by}")
    print(f"high-sensitivity threshold {op.high_sensitivity:.4f}: sensitivity {at_hs.sensitivity}, "
          f"specificity {at_hs.specificity}")
    if at_hp is not None:
        print(f"high-specificity threshold {op.high_specificity:.4f}: specificity {at_hp.specificity}, "
              f"sensitivity {at_hp.sensitivity}")
    else:
        print(f"high-specificity threshold {op.high_specificity:.4f}: kept (no specificity target)")
    for part, b in profile.body_parts.items():
        print(f"  {part}: own points {b.operating_points.high_sensitivity:.4f} / "
              f"{b.operating_points.high_specificity:.4f} ({b.cases} cases, {b.positives} fractured)")
    for part, why in skipped.items():
        print(f"  {part}: site-wide points ({why})")
    print(f"wrote {path}; restart the node to use it")

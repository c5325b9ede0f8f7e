"""``dicomai model drift``: the node's scores against the validation set's.

Prints the population stability index (PSI) of the analysed images' probabilities against
the reference in the model's manifest, and the share flagged at each operating point, for
all images and per body part; warns (stderr and the log) when the PSI of all images passes
0.2 on at least 100 images. Per body part the PSI is against the reference of all regions
together, so a site's mix of body parts shows in it: it is shown, not warned on.
"""

from __future__ import annotations

import argparse
import json
import sys

import structlog

from dicomai.cli import ExitCode, Subparsers, json_flag, sessions
from dicomai.cli.feedback import model_actions
from dicomai.cli.studies import parse_since
from dicomai.config import Settings

__all__ = ["cmd_model_drift", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``model drift`` (after the ``model`` group is registered)."""
    p = model_actions(subparsers).add_parser(
        "drift", parents=[common], help="population stability index of the scores against validation")
    p.add_argument("--since", type=parse_since, default=None, metavar="WHEN",
                   help="images analysed since (30d, 24h, or an ISO date); default: all")
    json_flag(p)
    p.set_defaults(func=cmd_model_drift)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_model_drift(args: argparse.Namespace, settings: Settings) -> int:
    """Print the drift figures; exit 2 when the model has no reference distribution."""
    from dicomai.analysis.image import operating_points
    from dicomai.cli.model import model_dir
    from dicomai.model.drift import MIN_IMAGES, PSI_WARN, drift
    from dicomai.model.package import load_package
    from dicomai.store.drift import image_scores

    package = load_package(model_dir(settings, None), check_hash=False)
    reference = package.manifest.reference
    if reference is None:
        print(f"dicomai: {package.manifest.name} {package.manifest.version} has no reference "
              "distribution in its manifest", file=sys.stderr)
        return ExitCode.USAGE
    with sessions(settings)() as s:
        rows = image_scores(s, since=args.since, model_sha256=package.manifest.sha256)
    points = operating_points(settings, package)
    overall = drift(reference.scores, [p for p, _ in rows], points)
    parts = sorted({(part or "").upper() for _, part in rows})
    by_part = {part or "(none)": drift(reference.scores, [p for p, bp in rows if (bp or "").upper() == part],
                                       points) for part in parts}
    if overall.drifted:
        structlog.get_logger("dicomai").warning("model.drift", psi=round(overall.psi or 0.0, 4),
                                                images=overall.images, threshold=PSI_WARN)
    if args.json:
        print(json.dumps({"model": f"{package.manifest.name} {package.manifest.version}",
                          "threshold": PSI_WARN, "min_images": MIN_IMAGES, **overall.as_dict(),
                          "body_parts": {k: v.as_dict() for k, v in by_part.items()}}, indent=2))
    else:
        ref = reference.scores
        print(f"{package.manifest.name} {package.manifest.version}: reference {ref.images} images "
              f"({ref.data}); flagged there: {ref.high_sensitivity_rate:.3f} at the high-sensitivity "
              f"point, {ref.high_specificity_rate:.3f} at the high-specificity point")
        print(f"{'body part':12} {'images':>7} {'PSI':>7} {'flagged hs':>10} {'flagged hp':>10}")
        for name, d in [("(all)", overall), *by_part.items()]:
            psi = "-" if d.psi is None else f"{d.psi:.3f}"
            print(f"{name:12} {d.images:>7} {psi:>7} {_rate(d.high_sensitivity_rate):>10} "
                  f"{_rate(d.high_specificity_rate):>10}")
        if not overall.enough:
            print(f"too few images for a verdict (fewer than {MIN_IMAGES})")
    if overall.drifted:
        print(f"dicomai: warning: the scores have drifted from the validation set's (PSI "
              f"{overall.psi:.3f} > {PSI_WARN}): check the operating points (dicomai calibrate)",
              file=sys.stderr)
    return ExitCode.OK

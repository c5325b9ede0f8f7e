"""``dicomai model drift``: the node's scores against the validation set's.

Prints the population stability index (PSI) of the analysed images' probabilities against
the reference in the model's manifest, and the share flagged at each operating point, for
all images, per body part and per manufacturer, with the PSI of the images' windowed mean
intensities where the manifest has their reference, and each group's median matrix size and
bit depths; warns (stderr and the log) when the scores' PSI of all images, or of one
manufacturer's, passes 0.2 on at least 100 images (the intensities' is shown only: see
``Drift.drifted``). A body part's PSI is against the reference of all regions together, so a
site's mix of body parts shows in it: it is shown, not warned on (``judged``).
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


def cmd_model_drift(args: argparse.Namespace, settings: Settings) -> int:
    """Print the drift figures; exit 2 when the model has no reference distribution."""
    from dicomai.analysis.image import operating_points
    from dicomai.cli.model import model_dir
    from dicomai.model.drift import MIN_IMAGES, PSI_WARN, drifted_groups, watch
    from dicomai.model.package import load_package
    from dicomai.store.drift import image_samples

    package = load_package(model_dir(settings, None), check_hash=False)
    reference = package.manifest.reference
    if reference is None:
        print(f"dicomai: {package.manifest.name} {package.manifest.version} has no reference "
              "distribution in its manifest", file=sys.stderr)
        return ExitCode.USAGE
    with sessions(settings)() as s:
        samples = image_samples(s, since=args.since, model_sha256=package.manifest.sha256)
    groups = watch(reference, samples, operating_points(settings, package))
    overall = groups["all"]
    by_part = {k.split("=", 1)[1]: v for k, v in groups.items() if k.startswith("body_part=")}
    by_maker = {k.split("=", 1)[1]: v for k, v in groups.items() if k.startswith("manufacturer=")}
    drifted = drifted_groups(groups)
    if drifted:
        structlog.get_logger("dicomai").warning("model.drift", threshold=PSI_WARN,
                                                groups={name: d.brief() for name, d in drifted.items()})
    if args.json:
        print(json.dumps({"model": f"{package.manifest.name} {package.manifest.version}",
                          "threshold": PSI_WARN, "min_images": MIN_IMAGES, **overall.as_dict(),
                          # a body part's PSI is shown, not judged (drift.judged): no verdict
                          "body_parts": {k: {n: x for n, x in v.as_dict().items() if n != "drifted"}
                                         for k, v in by_part.items()},
                          "manufacturers": {k: v.as_dict() for k, v in by_maker.items()}}, indent=2))
    else:
        ref = reference.scores
        print(f"{package.manifest.name} {package.manifest.version}: reference {ref.images} images "
              f"({ref.data}); flagged there: {ref.high_sensitivity_rate:.3f} at the high-sensitivity "
              f"point, {ref.high_specificity_rate:.3f} at the high-specificity point")
        if reference.intensity is None:
            print("no reference of image intensities in the manifest: intensity PSI not computed")
        print(f"{'group':28} {'images':>7} {'PSI':>7} {'int. PSI':>8} {'flagged hs':>10} {'flagged hp':>10} "
              f"{'median size':>11} bits")
        rows = [("(all)", overall), *[(f"body part {k}", v) for k, v in by_part.items()],
                *[(f"manufacturer {k}", v) for k, v in by_maker.items()]]
        for name, d in rows:
            size = f"{d.median_size[0]}x{d.median_size[1]}" if d.median_size else "-"
            print(f"{name[:28]:28} {d.images:>7} {_num(d.psi):>7} {_num(d.intensity_psi):>8} "
                  f"{_num(d.high_sensitivity_rate):>10} {_num(d.high_specificity_rate):>10} {size:>11} "
                  f"{','.join(map(str, d.bit_depths)) or '-'}")
        if not overall.enough:
            print(f"too few images for a verdict (fewer than {MIN_IMAGES})")
    for name, d in drifted.items():
        which = "all images" if name == "all" else name.replace("=", " ")
        print(f"dicomai: warning: the scores have drifted from the validation set's ({which}: PSI "
              f"{_num(d.psi)} > {PSI_WARN}): check the operating points (dicomai calibrate)",
              file=sys.stderr)
    return ExitCode.OK


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

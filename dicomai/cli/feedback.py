"""``dicomai feedback`` and ``dicomai model performance``: final reads and what they show.

A radiologist's final read of a study (confirmed fracture, no fracture, another finding) is
stored in the audit database with who and when. ``model performance`` sets the node's grades
of the studies read against those reads, at both operating points:

- *flagged at the high-sensitivity point*: grade ``doubtful`` or ``positive``
  (probability >= the high-sensitivity threshold);
- *flagged at the high-specificity point*: grade ``positive`` (>= the high-specificity one).

"Another finding" counts as no fracture. Each figure comes with its Wilson 95% interval.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os

from dicomai.cli import ExitCode, Subparsers, json_flag, sessions
from dicomai.cli.studies import parse_since
from dicomai.config import Settings

__all__ = ["cmd_feedback", "cmd_model_performance", "current_user", "model_actions", "register"]

READS = ("fracture", "no_fracture", "other")


def current_user() -> str:
    """Who runs the command, when ``--by`` does not say: through sudo (the README runs the CLI
    as the service user) the person who ran sudo, not the service account."""
    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def model_actions(subparsers: Subparsers[argparse.ArgumentParser]) -> Subparsers[argparse.ArgumentParser]:
    """The ``model`` group's own sub-commands, to add actions to it from here."""
    model = subparsers.choices["model"]
    # argparse has no public way back to a parser's sub-commands.
    for action in model._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action
    raise LookupError("the model command group has no actions")


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``feedback`` and ``model performance`` (after the ``model`` group is registered)."""
    fb = subparsers.add_parser("feedback", parents=[common],
                               help="record a radiologist's final read of a study")
    fb.add_argument("study_instance_uid", metavar="STUDY_UID")
    fb.add_argument("--read", required=True, choices=READS,
                    help="the final read: confirmed fracture, no fracture, or another finding")
    fb.add_argument("--by", default=None, metavar="NAME", help="who read it (default: the OS user)")
    fb.add_argument("--note", default=None, metavar="TEXT", help="free text, kept with the read")
    fb.set_defaults(func=cmd_feedback)

    perf = model_actions(subparsers).add_parser(
        "performance", parents=[common],
        help="PPV, NPV, sensitivity and specificity of the node against radiologists' reads")
    perf.add_argument("--since", type=parse_since, default=None, metavar="WHEN",
                      help="studies received since (30d, 24h, or an ISO date); default: all")
    json_flag(perf)
    perf.set_defaults(func=cmd_model_performance)


def cmd_feedback(args: argparse.Namespace, settings: Settings) -> int:
    """Store a final read of a study the node knows (exit 1 for an unknown study)."""
    from dicomai.store.feedback import record_feedback
    from dicomai.store.models import FeedbackRead

    by = args.by or current_user()
    with sessions(settings).begin() as s:
        row = record_feedback(s, args.study_instance_uid, FeedbackRead(args.read), by, args.note)
    print(f"recorded: {args.study_instance_uid} read {args.read} by {by} at {row.recorded_at.isoformat()}")
    return ExitCode.OK


def cmd_model_performance(args: argparse.Namespace, settings: Settings) -> int:
    """Print the node's performance on the studies with a final read."""
    from dicomai.cli.model import model_dir
    from dicomai.model.package import load_package
    from dicomai.store.feedback import graded_by, performance, reviewed_studies

    package = load_package(model_dir(settings, None), check_hash=False)
    with sessions(settings)() as s:
        studies, other_model = graded_by(reviewed_studies(s, since=args.since), package.manifest.sha256)
    truth = [r.fractured for r in studies]
    figures = performance(studies)
    points = {
        "high_sensitivity": ("doubtful or positive (>= high-sensitivity threshold)",
                             figures["high_sensitivity"]),
        "high_specificity": ("positive (>= high-specificity threshold)", figures["high_specificity"]),
    }
    since: dt.datetime | None = args.since
    if args.json:
        print(json.dumps({"since": since.isoformat() if since else None,
                          "model": f"{package.manifest.name} {package.manifest.version}",
                          "studies": len(studies), "fractured": sum(truth),
                          "other_model_studies": other_model,
                          **{k: {"flagged": what, **c.as_dict()} for k, (what, c) in points.items()}},
                         indent=2))
        return ExitCode.OK
    print(f"studies with a final read: {len(studies)} ({sum(truth)} fractured)"
          + (f", received since {since.isoformat()}" if since else "")
          + f", graded by {package.manifest.name} {package.manifest.version}")
    if other_model:
        print(f"{other_model} read stud{'y' if other_model == 1 else 'ies'} graded by another model left out")
    for what, c in points.values():
        print(f"flagged = {what}: TP {c.tp} FP {c.fp} TN {c.tn} FN {c.fn}")
        print(f"  PPV          {c.ppv}")
        print(f"  NPV          {c.npv}")
        print(f"  sensitivity  {c.sensitivity}")
        print(f"  specificity  {c.specificity}")
    print("intervals: Wilson 95%; a read of another finding counts as no fracture")
    return ExitCode.OK

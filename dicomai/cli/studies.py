"""``dicomai studies``: received studies as the audit database records them."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from typing import Any

from dicomai.cli import ExitCode, Subparsers, cell, iso, json_flag, print_table, sessions
from dicomai.config import Settings
from dicomai.model.grading import Grade
from dicomai.store.models import StudyState
from dicomai.store.queries import StudyListing, StudyRecord, list_studies, study_record

__all__ = ["cmd_studies_list", "cmd_studies_show", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``studies list`` and ``studies show``."""
    studies = subparsers.add_parser("studies", parents=[common], help="query received studies")
    ssub = studies.add_subparsers(dest="studies_command", required=True, metavar="ACTION")
    ls = ssub.add_parser("list", parents=[common], help="list studies, newest first")
    ls.add_argument("--since", type=parse_since, metavar="WHEN",
                    help="last arrival at or after WHEN: an ISO date/time (UTC unless it says), "
                    "or a duration before now such as 24h, 7d, 30m")
    ls.add_argument("--state", choices=[s.value for s in StudyState])
    ls.add_argument("--grade", choices=[g.value for g in Grade])
    ls.add_argument("--limit", type=int, default=100, help="at most this many studies")
    json_flag(ls)
    ls.set_defaults(func=cmd_studies_list)
    show = ssub.add_parser("show", parents=[common], help="one study: instances and events")
    show.add_argument("study_uid")
    json_flag(show)
    show.set_defaults(func=cmd_studies_show)


def parse_since(value: str) -> dt.datetime:
    """``24h``, ``7d``, ``30m``, ``10s`` before now, or an ISO date/time (UTC unless it says)."""
    m = re.fullmatch(r"(\d+)\s*([smhd])", value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{unit: int(m.group(1))})
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an ISO date/time (2024-05-01, 2024-05-01T08:00) "
            "nor a duration (24h, 7d, 30m, 10s)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _study_row(row: StudyListing) -> dict[str, Any]:
    st = row.study
    return {"study_instance_uid": st.study_instance_uid, "state": st.state, "instances": row.instances,
            "received_at": iso(st.first_received_at), "last_received_at": iso(st.last_received_at),
            "processed_at": iso(st.processed_at), "reopen_count": st.reopen_count,
            "study_date": st.study_date, "accession_number": st.accession_number, "grade": st.grade,
            "probability": _rounded(st.probability)}


def _rounded(probability: float | None) -> float | None:
    """A probability as the node reports it: 3 decimals (the model is not finer than that)."""
    return None if probability is None else round(probability, 3)


def cmd_studies_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print studies, newest first, filtered by arrival, state and grade."""
    with sessions(settings)() as s:
        rows = [_study_row(row) for row in list_studies(s, since=args.since, state=args.state,
                                                         grade=args.grade, limit=args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["study_instance_uid", "accession_number", "state", "grade", "probability",
                           "instances", "received_at"])
    return ExitCode.OK


def _study_json(record: StudyRecord) -> dict[str, Any]:
    study, objects = record.study, record.results
    return {
        "study_instance_uid": study.study_instance_uid, "state": study.state,
        "patient_id": study.patient_id, "patient_name": study.patient_name,
        "accession_number": study.accession_number, "study_date": study.study_date,
        "received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "processed_at": iso(study.processed_at), "reopen_count": study.reopen_count,
        "grade": study.grade, "probability": _rounded(study.probability),
        "predictions": [
            {"level": p.level, "sop_instance_uid": p.sop_instance_uid, "run": p.run,
             "grade": p.grade, "probability": _rounded(p.probability), "reason": p.reason,
             "model": f"{p.model_name} {p.model_version}" if p.model_name else None,
             "gradcam": bool(p.gradcam and p.gradcam.get("available")),
             "gradcam_purged_at": iso(p.gradcam_purged_at), "gradcam_purge_reason": p.gradcam_purge_reason,
             "decode_ms": p.decode_ms, "normalize_ms": p.normalize_ms, "infer_ms": p.infer_ms,
             "gradcam_ms": p.gradcam_ms, "at": iso(p.created_at)}
            for p in record.predictions
        ],
        "results": [
            {"kind": o.kind, "run": o.run, "sop_instance_uid": o.sop_instance_uid,
             "series_instance_uid": o.series_instance_uid, "grade": o.grade, "path": o.path,
             "purged_at": iso(o.purged_at), "purge_reason": o.purge_reason,
             "shadow": o.shadow, "replaces": next((r.sop_instance_uid for r in objects
                                                   if r.id == o.replaces_id), None),
             "source_sop_instance_uid": next((i.sop_instance_uid for i, _ in record.instances
                                              if i.id == o.source_instance_id), None),
             "deliveries": [{"id": d.id, "destination": d.destination, "state": d.state,
                             "attempts": d.attempts, "last_error": d.last_error}
                            for d in record.deliveries if d.result_id == o.id]}
            for o in objects
        ],
        "instances": [
            {"sop_instance_uid": i.sop_instance_uid, "version": i.version,
             "series_instance_uid": se.series_instance_uid, "modality": se.modality,
             "sop_class_uid": i.sop_class_uid, "transfer_syntax_uid": i.transfer_syntax_uid,
             "size_bytes": i.size_bytes, "sha256": i.sha256, "state": i.state,
             "spool_path": i.spool_path, "received_at": iso(i.received_at),
             "purged_at": iso(i.purged_at), "purge_reason": i.purge_reason}
            for i, se in record.instances
        ],
        "events": [
            {"at": iso(e.at), "stage": e.stage, "event": e.event, "level": e.level,
             "sop_instance_uid": e.sop_instance_uid, "details": e.details, "error": e.error}
            for e in record.events
        ],
    }


def cmd_studies_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print one study with its instances, results, result objects and events; 1 if unknown."""
    with sessions(settings)() as s:
        record = study_record(s, args.study_uid)
        if record is None:
            print(f"no study {args.study_uid}", file=sys.stderr)
            return ExitCode.FAILURE
        data = _study_json(record)
    if args.json:
        print(json.dumps(data, indent=2))
        return ExitCode.OK
    for key in ("study_instance_uid", "state", "grade", "probability", "accession_number",
                "study_date", "received_at", "processed_at", "reopen_count"):
        print(f"{key:20} {cell(data[key])}")
    print("\ninstances:")
    print_table(data["instances"], ["sop_instance_uid", "version", "modality", "state",
                                    "transfer_syntax_uid", "size_bytes", "purged_at"])
    print("\nresults:")
    print_table(data["predictions"], ["level", "sop_instance_uid", "run", "grade", "probability",
                                      "reason", "model"])
    print("\nresult objects:")
    print_table([{**r, "deliveries": " ".join(f"{d['destination']}:{d['state']}" for d in r["deliveries"])}
                 for r in data["results"]], ["kind", "run", "sop_instance_uid", "grade", "deliveries",
                                             "purged_at"])
    print("\nevents:")
    print_table(data["events"], ["at", "stage", "event", "level", "sop_instance_uid", "error"])
    return ExitCode.OK

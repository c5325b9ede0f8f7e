"""Fuzz ``dicomai serve`` with mutated real files and malformed PDUs; it must stay healthy.

After every case a fresh association must get a C-ECHO and a valid C-STORE through; at the
end the node's log holds JSON lines only and no crashed thread, its peak RSS stays under
:data:`RSS_BOUND_MB`, and every mutated data set was refused with 0xC210/0xA900 (and
quarantined) or stored and then analysed, or recorded with a grade and a reason.

Seeded and bounded: ``DICOMAI_FUZZ_SEED`` (default 25), ``DICOMAI_FUZZ_FILES`` (300) and
``DICOMAI_FUZZ_PDUS`` (40) cases. The outcome table (category x inputs x clean, degraded,
failed) is printed (``pytest -s``) and written to ``fuzz-table.txt`` in the test's tmp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests import pdu
from tests.helpers import Node, make_study, pydicom_data, shared_file

SEED = int(os.environ.get("DICOMAI_FUZZ_SEED", "25"))
N_FILES = int(os.environ.get("DICOMAI_FUZZ_FILES", "300"))
N_PDUS = int(os.environ.get("DICOMAI_FUZZ_PDUS", "40"))
#: Peak RSS of the node over a whole run: the model loaded and analysing, plus the listener.
RSS_BOUND_MB = 1024

_REFUSED = {0xC210, 0xA900}
_ANALYSED = {"positive", "doubtful", "negative"}


# -- mutated data sets ---------------------------------------------------------------------
Mutation = Callable[[random.Random, Dataset], None]


def _set(keyword: str, value: object) -> Mutation:
    def mutate(_rng: random.Random, ds: Dataset) -> None:
        setattr(ds, keyword, value)
    return mutate


def _delete(keyword: str) -> Mutation:
    def mutate(_rng: random.Random, ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)
    return mutate


def _raw(keyword: str, vr: str, value: bytes) -> Mutation:
    """Put ``value`` in the data set as raw bytes, past pydicom's validation of the VR."""
    def mutate(_rng: random.Random, ds: Dataset) -> None:
        tag = Tag(tag_for_keyword(keyword))
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)  # noqa: SLF001
    return mutate


def _short_modality_lut(_rng: random.Random, ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = b"\x00\x01"
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]


def _half_pixels(_rng: random.Random, ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _bad_charset_name(_rng: random.Random, ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = b"\xff\xfe\xc3("  # not UTF-8


#: Data-set level mutations: what real archives and broken modalities send.
ATTRIBUTE_MUTATIONS: dict[str, Mutation] = {
    "frames_text": _raw("NumberOfFrames", "IS", b"abc "),
    "frames_zero": _set("NumberOfFrames", "0"),
    "frames_many": _set("NumberOfFrames", "9999"),
    "rows_zero": _set("Rows", 0),
    "columns_one": _set("Columns", 1),
    "bits_allocated_7": _set("BitsAllocated", 7),
    "bits_stored_40": _set("BitsStored", 40),
    "high_bit_40": _set("HighBit", 40),
    "samples_3": _set("SamplesPerPixel", 3),
    "photometric_xyz": _set("PhotometricInterpretation", "XYZ"),
    "photometric_palette": _set("PhotometricInterpretation", "PALETTE COLOR"),
    "pixel_representation_2": _set("PixelRepresentation", 2),
    "padding_one_byte": _raw("PixelPaddingValue", "US", b"\x01"),
    "rescale_slope_text": _raw("RescaleSlope", "DS", b"abc "),
    "rescale_slope_zero": _set("RescaleSlope", "0"),
    "rescale_intercept_huge": _set("RescaleIntercept", "1e400"),
    "window_empty": _set("WindowCenter", ""),
    "window_width_zero": _set("WindowWidth", "0"),
    "modality_lut_short": _short_modality_lut,
    "no_birth_date": _delete("PatientBirthDate"),
    "no_patient_name": _delete("PatientName"),
    "no_modality": _delete("Modality"),
    "modality_xx": _set("Modality", "XX"),
    "charset_mismatch": _bad_charset_name,
    "body_part_long": _raw("BodyPartExamined", "CS", b"X" * 200),
    "spacing_text": _raw("ImagerPixelSpacing", "DS", b"a\\b "),
    "no_study_uid": _delete("StudyInstanceUID"),
    "sop_uid_reused": _set("SOPInstanceUID", "1.2.3.4"),  # pydicom syncs the File Meta
    "series_uid_blank": _raw("SeriesInstanceUID", "UI", b"  "),
    "no_pixel_data": _delete("PixelData"),
    "empty_pixel_data": _raw("PixelData", "OB", b""),
    "half_pixel_data": _half_pixels,
}


def _flip(rng: random.Random, data: bytearray, start: int = 0, end: int | None = None) -> None:
    end = len(data) if end is None else min(end, len(data))
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(start, end)
        data[at] ^= 1 << rng.randrange(8)


def _run(rng: random.Random, data: bytearray, byte: int) -> None:
    at = rng.randrange(len(data))
    data[at:at + rng.randint(2, 16)] = bytes([byte]) * len(data[at:at + 16])


#: Byte-level mutations of the encoded data set (the File Meta stays intact).
BYTE_MUTATIONS: dict[str, Callable[[random.Random, bytearray], bytearray]] = {
    "flip_header": lambda rng, d: (_flip(rng, d, 0, 1024), d)[1],
    "flip_anywhere": lambda rng, d: (_flip(rng, d), d)[1],
    "truncate": lambda rng, d: d[: rng.randrange(1, len(d))],
    "insert_junk": lambda rng, d: (lambda at: d[:at] + bytearray(rng.randbytes(rng.randint(1, 64)))
                                   + d[at:])(rng.randrange(len(d))),
    "zero_run": lambda rng, d: (_run(rng, d, 0x00), d)[1],
    "ff_run": lambda rng, d: (_run(rng, d, 0xFF), d)[1],
}

#: Small real files: a radiograph made a hand (in the model's scope, analysed: half the
#: cases), and three the node stores without analysing (secondary captures, a CT).
SOURCES = [("shared", "dx_image.dcm"), ("shared", "JPEGExtended_1s_1f_u_16_12.dcm"),
           ("pydicom", "CT_small.dcm"), ("pydicom", "JPEG2000.dcm")]
IN_SCOPE = {"dx_image.dcm": "HAND"}


@dataclass
class Case:
    category: str
    mutation: str
    path: Path
    sop_instance_uid: str
    in_scope: bool


def _source_paths() -> list[Path]:
    return [shared_file(n) if kind == "shared" else pydicom_data(n) for kind, n in SOURCES]


def _split(raw: bytes) -> tuple[bytes, bytes]:
    end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[:end], raw[end:]


def make_cases(out: Path, n: int, seed: int) -> list[Case]:
    """``n`` mutated copies of the sources, each in a study of its own."""
    rng = random.Random(seed)
    sources = _source_paths()
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        while len(cases) < n:
            source = sources[0] if rng.random() < 0.5 else rng.choice(sources[1:])
            ds = dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            body_part = IN_SCOPE.get(source.name)
            if body_part:
                ds.BodyPartExamined = body_part
            path = out / f"{len(cases):04d}.dcm"
            if rng.random() < 0.55:
                name = rng.choice(sorted(ATTRIBUTE_MUTATIONS))
                try:
                    ATTRIBUTE_MUTATIONS[name](rng, ds)
                    ds.save_as(path, enforce_file_format=True)
                except Exception:  # noqa: BLE001 -- pydicom will not write it: pick another
                    continue
                category = "attribute"
            else:
                ds.save_as(path, enforce_file_format=True)
                meta, data = _split(path.read_bytes())
                name = rng.choice(sorted(BYTE_MUTATIONS))
                path.write_bytes(meta + bytes(BYTE_MUTATIONS[name](rng, bytearray(data))))
                category = "bytes"
            sop_uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
            cases.append(Case(category, name, path, sop_uid, body_part is not None))
    finally:
        pydicom_config.settings.writing_validation_mode = old
    return cases


# -- malformed PDUs ---------------------------------------------------------------------------
@dataclass
class PduCase:
    name: str
    chunks: list[bytes]
    read_after: int | None = None
    #: Closing without a word is the protocol's answer (a request never completed, a peer that
    #: aborted first, a flipped length that leaves the node waiting for bytes that never come).
    silent_ok: bool = False


def _rq_items(body_tail: bytes) -> bytes:
    """An A-ASSOCIATE-RQ with the given variable items after the fixed fields."""
    fixed = struct.pack(">HH", 1, 0) + b"DICOMAI".ljust(16) + b"FUZZER".ljust(16) + bytes(32)
    return pdu.pdu(pdu.A_ASSOCIATE_RQ, fixed + body_tail)


def make_pdu_cases(n: int, seed: int) -> list[PduCase]:
    """Hand-written malformed PDU sequences, then seeded byte flips of a valid echo."""
    rq = pdu.associate_rq(calling="FUZZER")
    echo = pdu.p_data(1, pdu.echo_command())
    app = pdu.item(0x10, pdu.APPLICATION_CONTEXT.encode())
    ctx = pdu.presentation_context(1, pdu.VERIFICATION, [pdu.IMPLICIT_LE])
    fixed: list[PduCase] = [
        PduCase("unknown_pdu_type", [pdu.pdu(0x09, bytes(16))]),
        PduCase("huge_rq_length", [struct.pack(">BBL", 1, 0, 2**31)]),
        PduCase("rq_cut_short", [rq[: len(rq) // 2]], silent_ok=True),
        PduCase("header_only", [rq[:6]], silent_ok=True),
        PduCase("protocol_version_0", [pdu.associate_rq(version=0)]),
        PduCase("no_application_context", [_rq_items(ctx + pdu.user_information())]),
        PduCase("no_user_information", [_rq_items(app + ctx)]),
        PduCase("item_longer_than_pdu", [_rq_items(app + struct.pack(">BBH", 0x20, 0, 60000))]),
        PduCase("blank_calling_ae", [pdu.associate_rq(calling=b"")]),
        PduCase("control_char_called_ae", [pdu.associate_rq(called=b"DICOM\x07AI")]),
        PduCase("no_presentation_context", [pdu.associate_rq(contexts=[])]),
        PduCase("unknown_abstract_syntax",
                [pdu.associate_rq(contexts=[pdu.presentation_context(1, "1.2.3", [pdu.IMPLICIT_LE])])]),
        PduCase("p_data_before_rq", [echo]),
        PduCase("release_before_rq", [pdu.release_rq()]),
        PduCase("abort_at_once", [pdu.pdu(pdu.A_ABORT, bytes(4))], silent_ok=True),
        PduCase("ac_sent_to_scp", [pdu.pdu(pdu.A_ASSOCIATE_AC, rq[6:])]),
        PduCase("garbled_command", [rq, pdu.p_data(1, bytes(range(64)))], read_after=1),
        PduCase("command_short_value", [rq, pdu.p_data(1, pdu.command_set([(0x0100, b"\x30")]))],
                read_after=1),
        PduCase("wrong_context_id", [rq, pdu.p_data(9, pdu.echo_command())], read_after=1),
        PduCase("empty_pdv", [rq, pdu.pdu(pdu.P_DATA_TF, struct.pack(">L", 0))], read_after=1),
        PduCase("pdv_longer_than_pdu", [rq, pdu.pdu(pdu.P_DATA_TF, struct.pack(">LBB", 5000, 1, 3))],
                read_after=1),
        PduCase("data_set_without_command", [rq, pdu.p_data(1, b"\x08\x00\x16\x00", command=False)],
                read_after=1),
        PduCase("second_rq", [rq, rq], read_after=1),
        PduCase("p_data_over_max_pdu", [rq, struct.pack(">BBL", 4, 0, 2**20) + bytes(64)],
                read_after=1),
    ]
    rng = random.Random(seed)
    valid = rq + echo + pdu.release_rq()
    cases = fixed[:n]
    while len(cases) < n:
        data = bytearray(valid)
        _flip(rng, data)
        cases.append(PduCase(f"flipped_echo_{len(cases)}", [bytes(data)], silent_ok=True))
    return cases


# -- the node and the checks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fuzz")
    node = Node(data_dir=tmp / "data", env_extra={
        "DICOMAI_NODE__ACSE_TIMEOUT_S": "2", "DICOMAI_NODE__NETWORK_TIMEOUT_S": "3",
        "DICOMAI_NODE__DIMSE_TIMEOUT_S": "10"})
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The valid instance stored after every case (a duplicate after the first time)."""
    _, (path,) = make_study([shared_file("dx_image.dcm")], tmp_path_factory.mktemp("canary"))
    return path


@contextlib.contextmanager
def _chunked() -> Iterator[None]:
    """pynetdicom sends a file's data set bytes as they are, without decoding them."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _store(port: int, path: Path) -> int | None:
    """Send one file as-is; its C-STORE status, None when the association ended without one."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    if not assoc.is_established:
        return None
    try:
        with _chunked():
            status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def _healthy(port: int, canary: Path) -> str | None:
    """None when a C-ECHO and a valid C-STORE succeed on a new association, else what failed."""
    meta = read_file_meta_info(canary)
    ae = AE(ae_title="HEALTH")
    ae.add_requested_context(Verification)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    if not assoc.is_established:
        return "association refused"
    try:
        echo = assoc.send_c_echo()
        if echo.get("Status") != 0:
            return f"C-ECHO {echo.get('Status')}"
        with _chunked():
            store = assoc.send_c_store(canary)
        return None if store.get("Status") == 0 else f"C-STORE {store.get('Status')}"
    finally:
        if assoc.is_established:
            assoc.release()


def _peak_rss_mb(node: Node) -> float:
    assert node.proc is not None
    status = Path(f"/proc/{node.proc.pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kb / 1024


def _log_problems(node: Node) -> list[str]:
    """Lines that are not JSON, crashed threads and tracebacks from dicomai's own loggers."""
    problems = []
    text = node.log()
    # The node is still running: its last line may be half written; judge complete lines only.
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"not JSON: {line[:200]}")
            continue
        if record.get("event") == "thread.crashed":
            problems.append(f"thread crashed: {record.get('exception', '')[-300:]}")
    return problems


def _wait_settled(db_path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            busy = db.execute("select count(*) from studies where state in "
                              "('receiving', 'processing')").fetchone()[0]
        if not busy:
            return
        time.sleep(1)
    raise AssertionError(f"{busy} studies not settled within {timeout} s")


class Table:
    """Outcomes by category: inputs, clean, degraded, failed (with the failed cases' names)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.failed: list[str] = []

    def add(self, category: str, outcome: str, what: str = "") -> None:
        self.counts[category][outcome] += 1
        if outcome == "failed":
            self.failed.append(f"{category}: {what}")

    def render(self) -> str:
        rows = ["| category | inputs | clean | degraded | failed |", "|---|---|---|---|---|"]
        for category, c in sorted(self.counts.items()):
            rows.append(f"| {category} | {sum(c.values())} | {c['clean']} | {c['degraded']} "
                        f"| {c['failed']} |")
        return "\n".join(rows)


@pytest.mark.integration
def test_fuzz_mutated_files_and_malformed_pdus(fuzz_node: Node, canary: Path, tmp_path: Path) -> None:
    """Seeded mutated real files and malformed PDUs: the node stays healthy after each, and
    every mutated data set is refused (0xC210/0xA900) or stored and graded with a reason."""
    node = fuzz_node
    started = time.monotonic()
    assert _healthy(node.port, canary) is None
    table = Table()
    stored: list[Case] = []
    degraded_pdus: list[str] = []
    statuses: dict[str, Counter[int | None]] = defaultdict(Counter)
    for case in make_cases(tmp_path / "cases", N_FILES, SEED):
        status = _store(node.port, case.path)
        statuses[case.mutation][status] += 1
        label = f"{case.mutation} -> {status if status is None else hex(status)}"
        if (problem := _healthy(node.port, canary)) is not None:
            table.add(f"data set: {case.category}", "failed", f"{label}, then {problem}")
        elif status in _REFUSED:
            table.add(f"data set: {case.category}", "clean")
        elif status == 0:
            stored.append(case)
        else:
            table.add(f"data set: {case.category}", "failed", label)
    for pcase in make_pdu_cases(N_PDUS, SEED):
        replies = pdu.exchange(node.port, pcase.chunks, timeout=10, read_after=pcase.read_after)
        last = replies[-1].pdu_type if replies else None
        if (problem := _healthy(node.port, canary)) is not None:
            table.add("PDU", "failed", f"{pcase.name}, then {problem}")
        elif last == -1:
            table.add("PDU", "failed", f"{pcase.name}: no answer and not closed within 10 s")
        elif last is None and not pcase.silent_ok:
            table.add("PDU", "degraded")  # dropped without the A-ABORT or -RJ it called for
            degraded_pdus.append(pcase.name)
        else:
            table.add("PDU", "clean")
    sent_s = time.monotonic() - started

    _wait_settled(node.data_dir / "audit.sqlite3")
    with sqlite3.connect(node.data_dir / "audit.sqlite3") as db:
        grades = {uid: (grade, reason) for uid, grade, reason in db.execute(
            "select sop_instance_uid, grade, reason from predictions where level='image'")}
    for case in stored:
        grade, reason = grades.get(case.sop_instance_uid, (None, None))
        category = f"data set: {case.category}"
        if grade in _ANALYSED:
            table.add(category, "clean")
        elif grade in ("failed", "not_analysed") and reason:
            # Out of scope anyway, or an in-scope image that lost its analysis, with why.
            table.add(category, "degraded" if case.in_scope else "clean")
        else:
            table.add(category, "failed", f"{case.mutation}: stored, grade {grade}, reason {reason}")
    peak = _peak_rss_mb(node)
    log_problems = _log_problems(node)
    report = (f"seed {SEED}, {N_FILES} files, {N_PDUS} PDU cases; sent and checked in "
              f"{sent_s:.0f} s, settled in {time.monotonic() - started:.0f} s; peak RSS "
              f"{peak:.0f} MB\n{table.render()}\n"
              + "\n".join(f"{m}: {dict(s)}" for m, s in sorted(statuses.items())))
    (tmp_path / "fuzz-table.txt").write_text(report)
    print(report)
    assert not table.failed, "\n".join(table.failed)
    assert not degraded_pdus, f"closed without an answer: {degraded_pdus}"
    assert not log_problems, "\n".join(log_problems[:20])
    assert peak < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB"

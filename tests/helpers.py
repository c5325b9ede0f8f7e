"""Shared test helpers: locating real peers, free ports, the node as a subprocess."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
#: The shared test data (docs/contributing.md): DICOMAI_TEST_DATA, else ``shared/data`` beside
#: the repository. Tests find every data file through these names.
TEST_DATA = Path(os.environ.get("DICOMAI_TEST_DATA") or REPO.parent / "shared" / "data")
SHARED_DICOM = TEST_DATA / "dicom"
FRACATLAS = TEST_DATA / "fracatlas"
WEIGHTS = TEST_DATA / "weights"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: DICOMAI_TEST_TRAIN=0: this venv lacks the train extra on purpose (the node's), so the
#: training tests skip even in CI; elsewhere in CI a missing train extra fails them.
TRAIN_OPTIONAL = os.environ.get("DICOMAI_TEST_TRAIN") == "0"

#: storescu flag that proposes each file's own (compressed) transfer syntax.
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended 12 bit
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
}


def missing(what: str) -> None:
    """Skip outside CI; in CI a missing required tool or service is a failure."""
    if IN_CI:
        pytest.fail(f"required for CI but missing: {what}")
    pytest.skip(f"missing: {what}")


@functools.cache
def _train_extra_absent() -> tuple[str, ...]:
    """The distributions of dicomai's train extra that are not installed."""
    from packaging.requirements import Requirement

    absent = []
    for line in importlib.metadata.requires("dicomai") or []:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": "train"}):
            try:
                importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                absent.append(req.name)
    return tuple(absent)


def require_train_extra() -> None:
    """Skip without the train extra; fail instead in CI unless TRAIN_OPTIONAL.

    At the top of a test module (before it imports dicomai.train) it skips the whole module;
    conftest.py calls it before every test marked ``train``.
    """
    absent = _train_extra_absent()
    if not absent:
        return
    what = f"the train extra ({', '.join(absent)}): pip install -e '.[train]'"
    if IN_CI and not TRAIN_OPTIONAL:
        pytest.fail(f"required for CI but missing: {what}", pytrace=False)
    why = "missing"
    if TRAIN_OPTIONAL:
        why = "DICOMAI_TEST_TRAIN=0 (the node's venv; CI runs these in .venv-train)"
    pytest.skip(f"{why}: {what}", allow_module_level=True)


def dcmtk(name: str) -> str:
    """Path of a dcmtk tool (pynetdicom installs Python apps with the same names)."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return candidate
    missing(f"dcmtk {name} (apt-get install dcmtk)")
    raise AssertionError  # unreachable


def shared_file(name: str) -> Path:
    path = SHARED_DICOM / name
    if not path.exists():
        missing(f"shared test data {path}")
    return path


def pydicom_data(name: str) -> Path:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        missing("pydicom")
    found = get_testdata_file(name)
    if not found:
        missing(f"pydicom-data file {name} (pip install pydicom-data)")
    return Path(str(found))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file, without preamble and file meta."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[132 + 12 + group_length:]


#: Body Part Examined as the images show it, for real files whose tag is a catch-all the
#: model's validated scope does not take (RG3: "EXTREMITY"; its study description says
#: "Non-ossifying fibroma of distal tibia").
TIBIA = "TIBIA"


def make_study(sources: list[Path], out_dir: Path, copies: int = 1,
               study_uid: str | None = None, dcmtk_encoding: bool = True,
               body_part: str | None = None) -> tuple[str, list[Path]]:
    """Copies of real files re-identified into one new study (pixel data untouched);
    ``body_part`` sets Body Part Examined on every copy."""
    study_uid = study_uid or generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sources:
        series_uid = generate_uid()
        for n in range(copies):
            ds = dcmread(src)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName = "Test^Patient"
            ds.PatientID = "PID-SECRET-42"
            ds.InstanceNumber = n + 1
            if body_part is not None:
                ds.BodyPartExamined = body_part
            if 0xFFFCFFFC in ds:  # storescu does not send Data Set Trailing Padding
                del ds[0xFFFCFFFC]
            path = out_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if dcmtk_encoding:
                # storescu re-encodes sequences with explicit lengths when it sends; let dcmtk
                # write the file the same way, so the file is byte for byte what goes on the wire.
                subprocess.run([dcmtk("dcmconv"), str(path), str(path)], check=True,
                               capture_output=True)
            paths.append(path)
    return study_uid, paths


@dataclass
class Node:
    """``dicomai serve`` in a subprocess on a free loopback port."""

    data_dir: Path
    db_url: str = ""
    ae_title: str = "DICOMAI"
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)  # the operations endpoint, one per node
    env_extra: dict[str, str] = field(default_factory=dict)
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMAI_")}
        env.update({
            "DICOMAI_NODE__DATA_DIR": str(self.data_dir),
            "DICOMAI_NODE__HOST": "127.0.0.1",
            "DICOMAI_NODE__PORT": str(self.port),
            "DICOMAI_HTTP__PORT": str(self.http_port),
            "DICOMAI_NODE__AE_TITLE": self.ae_title,
            "DICOMAI_STUDIES__QUIET_PERIOD_S": "1.0",
            "DICOMAI_STUDIES__POLL_INTERVAL_S": "0.2",
            "DICOMAI_STORAGE__MIN_FREE_MB": "16",
            "DICOMAI_LOGGING__FORMAT": "json",
            "DICOMAI_NODE__SHUTDOWN_GRACE_S": "5",
        })
        if self.db_url:
            env["DICOMAI_DATABASE__URL"] = self.db_url
        env.update(self.env_extra)
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cfg = ["--config", str(self.config)] if self.config else []
        out = subprocess.run([sys.executable, "-m", "dicomai", *args, *cfg], env=self.env(),
                             capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"dicomai {' '.join(args)} -> {out.returncode}\n{out.stderr}")
        return out

    def start(self, wait: bool = True) -> Node:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"node-{self.port}-{time.monotonic_ns()}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 -- kept open for the process' lifetime
        cfg = ["--config", str(self.config)] if self.config else []
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomai", "serve", *cfg], env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"node did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "list", "--json").stdout)  # type: ignore[no-any-return]

    def study(self, uid: str) -> dict[str, Any]:
        return json.loads(self.cli("studies", "show", uid, "--json").stdout)  # type: ignore[no-any-return]

    def wait_state(self, uid: str, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            out = self.cli("studies", "show", uid, "--json", check=False)
            if out.returncode == 0:
                last = json.loads(out.stdout)
                if last["state"] == state:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"study {uid} not {state!r} within {timeout}s: {last.get('state')}")


def storescu(port: int, files: list[Path], aec: str = "DICOMAI", aet: str = "STORESCU",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu, each file's own transfer syntax proposed."""
    by_ts: dict[str, list[Path]] = {}
    for f in files:
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        by_ts.setdefault(ts, []).append(f)
    result = None
    for ts, group in by_ts.items():
        cmd = [dcmtk("storescu"), "-R", STORESCU_TS_FLAG.get(ts, "-xe"), "-aet", aet, "-aec", aec,
               *(extra or []), "127.0.0.1", str(port), *map(str, group)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return result
    assert result is not None
    return result


@dataclass
class Orthanc:
    """A real Orthanc (Debian package) on free loopback ports, started for one test."""

    workdir: Path
    modalities: dict[str, tuple[str, str, int]]
    aet: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)  # more Orthanc configuration options
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            missing("Orthanc (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomai-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [], "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            **self.extra,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start:\n" + (self.workdir / "orthanc.log").read_text())

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series Orthanc holds for a study (empty when it has none)."""
        found = self.post("/tools/lookup", study_uid)
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        return self.get(f"/studies/{ids[0]}/series") if ids else []  # type: ignore[no-any-return]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: bytes | dict[str, Any] | str) -> Any:
        data = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else json.dumps(body).encode())
        req = urllib.request.Request(self.url(path), data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``mount``: a disk that really fills (root only; CI runs as root)."""
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        missing(f"a tmpfs mount (root and CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def received_instance(session: Any, study_id: int, series_id: int, sop_instance_uid: str,
                      at: Any) -> Any:
    """An audit row of a processed CR instance (its file is not needed), added and flushed so
    that predictions can refer to its id."""
    from dicomai.store import Instance

    inst = Instance(study_id=study_id, series_id=series_id, sop_instance_uid=sop_instance_uid,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    size_bytes=1, sha256="0" * 64, spool_path="x", state="processed", received_at=at)
    session.add(inst)
    session.flush()
    return inst

"""C-STORE throughput of `dicomai serve` against Orthanc and dcmtk's `storescp`, same sender, same run.

For small (~37 KB DX) and large (~6 MB uncompressed CR) instances, dcmtk `storescu` sends
the same files in one association to each receiver in turn; each receiver is a fresh
process on a free loopback port writing to its own temporary folder. dicomai runs with its
defaults (fsync of every file and its directory, SQLite audit row committed with
synchronous=FULL before each acknowledgement); storescp writes files without fsync (it has no
such option), so the comparison favours storescp on durability. Orthanc (Debian package) runs
with its defaults (durable storage area, SQLite index) and TCP_NODELAY=1 like the dcmtk tools;
it is the PACS a hospital would put next to the node.

    python benchmarks/ingest.py [--small N] [--large N] [--repeat R] [--tls]

With --tls, one more column: dicomai with DICOM TLS ([tls], client certificate required,
certificates made with the openssl tool for the run), storescu +tls sending to its TLS port.

Prints one table: instances/s and MB/s per receiver (median of R runs), the time ratio
dicomai / Orthanc (<= 1.0 means at least as fast as Orthanc), the rate ratio dicomai / null
(the share of pynetdicom's own ceiling the node reaches) and storescp / dicomai.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DICOMAI_TEST_DATA", REPO.parent / "shared" / "data")) / "dicom"


def dcmtk(name: str) -> str:
    for cand in (f"/usr/bin/{name}", shutil.which(name)):
        if cand and Path(cand).exists():
            return cand
    sys.exit(f"dcmtk {name} not found (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit("receiver did not start")


def make_files(src: Path, n: int, out: Path) -> list[Path]:
    out.mkdir(parents=True)
    study = generate_uid()
    files = []
    for i in range(n):
        ds = dcmread(src)
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if 0xFFFCFFFC in ds:
            del ds[0xFFFCFFFC]
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# Debian's dcmtk keeps Nagle's algorithm on unless TCP_NODELAY=1 is set; with it on, every
# small instance waits for a delayed ACK (~40 ms) and the benchmark measures timers, not
# receivers. Both dcmtk tools run with it off.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def send(port: int, aec: str, files: list[Path], extra: list[str] | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([dcmtk("storescu"), "-R", "-aec", aec, *(extra or []), "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"storescu failed: {out.stderr[-2000:]}")
    return elapsed


def receive(cmd: list[str], port: int, aec: str, files: list[Path], env: dict[str, str] | None = None,
            stored: Path | None = None, send_flags: list[str] | None = None) -> float:
    """Start a receiver, time one storescu run against it, stop it, check what it kept."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        return send(port, aec, files, send_flags)
    finally:
        proc.terminate()
        proc.wait()
        if stored is not None:
            n = sum(1 for p in stored.rglob("*") if p.is_file())
            if n != len(files):
                sys.exit(f"{aec} stored {n} of {len(files)} files")


def make_pki(root: Path) -> Path:
    """A CA, the node's certificate (127.0.0.1) and a client's, P-256, in ``root``."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    root.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE")
    for name, san in (("node", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (root / f"{name}.ext").write_text(san + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
        (root / f"{name}.key").chmod(0o600)
    return root


def run_dicomai(files: list[Path], work: Path, fsync: bool = True, pki: Path | None = None) -> float:
    """dicomai serve; with ``pki``, storescu sends over DICOM TLS to its TLS port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMAI_")}
    env.update({"DICOMAI_NODE__DATA_DIR": str(work / "dicomai"), "DICOMAI_NODE__PORT": str(port),
                "DICOMAI_NODE__HOST": "127.0.0.1", "DICOMAI_LOGGING__FORMAT": "json",
                "DICOMAI_STORAGE__MIN_FREE_MB": "64", "DICOMAI_STORAGE__FSYNC": str(fsync).lower(),
                # the benchmark measures receiving: no classification during the run
                "DICOMAI_STUDIES__QUIET_PERIOD_S": "3600"})
    flags = None
    if pki is not None:
        tls_port = free_port()
        env.update({"DICOMAI_TLS__ENABLED": "true", "DICOMAI_TLS__PORT": str(tls_port),
                    "DICOMAI_TLS__CERTIFICATE": str(pki / "node.pem"),
                    "DICOMAI_TLS__PRIVATE_KEY": str(pki / "node.key"),
                    "DICOMAI_TLS__CA_CERTIFICATES": str(pki / "ca.pem")})
        flags = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
        port = tls_port
    return receive([sys.executable, "-m", "dicomai", "serve"], port, "DICOMAI", files, env,
                   stored=work / "dicomai" / "spool", send_flags=flags)


def run_storescp(files: list[Path], work: Path) -> float:
    port = free_port()
    out_dir = work / "storescp"
    out_dir.mkdir()
    return receive([dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out_dir), str(port)], port,
                   "STORESCP", files, DCMTK_ENV, stored=out_dir)


def run_orthanc(files: list[Path], work: Path) -> float:
    """Orthanc with its default durable storage and SQLite index; checks it indexed every file."""
    import json
    import urllib.request

    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        sys.exit("Orthanc not found (apt-get install orthanc)")
    port, http = free_port(), free_port()
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "HttpPort": http, "DicomPort": port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1", "Plugins": [],
        "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False}))
    proc = subprocess.Popen([binary, str(cfg)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        elapsed = send(port, "ORTHANC", files)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=30) as rsp:
            count = json.loads(rsp.read())["CountInstances"]
        if count != len(files):
            sys.exit(f"Orthanc indexed {count} of {len(files)} instances")
        return elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_null(files: list[Path], work: Path) -> float:
    """pynetdicom with a handler that keeps nothing: the network layer's ceiling."""
    port = free_port()
    return receive([sys.executable, str(Path(__file__).with_name("_null_scp.py")), str(port)], port,
                   "NULLSCP", files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300, help="number of small instances")
    parser.add_argument("--large", type=int, default=30, help="number of large instances")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tls", action="store_true",
                        help="add a column: dicomai over DICOM TLS (storescu +tls, client certificate)")
    args = parser.parse_args()
    from pydicom.data import get_testdata_file

    sources = {"small": SHARED / "dx_image.dcm", "large": Path(str(get_testdata_file("RG3_UNCR.dcm")))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dicomai-bench-") as tmp:
        pki = make_pki(Path(tmp) / "pki") if args.tls else None
        for label, count in (("small", args.small), ("large", args.large)):
            files = make_files(sources[label], count, Path(tmp) / label)
            mb = sum(f.stat().st_size for f in files) / 1e6
            times: dict[str, list[float]] = {"dicomai": [], "nofsync": [], "orthanc": [], "null": [],
                                             "storescp": []}
            receivers: list[tuple[str, Callable[[list[Path], Path], float]]] = [
                ("dicomai", run_dicomai),
                ("nofsync", lambda f, w: run_dicomai(f, w, fsync=False)),
                ("orthanc", run_orthanc),
                ("null", run_null),
                ("storescp", run_storescp)]
            if pki is not None:
                times["tls"] = []
                receivers.append(("tls", lambda f, w: run_dicomai(f, w, pki=pki)))
            for r in range(args.repeat):
                for name, fn in receivers:
                    work = Path(tmp) / f"{label}-{name}-{r}"
                    work.mkdir()
                    times[name].append(fn(files, work))
                    shutil.rmtree(work)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((label, count, mb / count, med))
    print(f"C-STORE throughput, storescu -> receiver on loopback, median of {args.repeat} runs, "
          f"{os.cpu_count()} CPUs")
    print("dicomai: fsync on (default) | nofsync: storage.fsync=false (SQLite still synchronous=FULL)")
    print("orthanc: Debian Orthanc, defaults (durable storage, SQLite index)")
    print("null: pynetdicom SCP that keeps nothing (network-layer ceiling) | storescp: dcmtk, no fsync")
    if args.tls:
        print("tls: dicomai over DICOM TLS (P-256 certificates, client certificate required, "
              "storescu's default BCP 195 profile)")
    cols = ["dicomai", "nofsync", "orthanc", "null", "storescp"] + (["tls"] if args.tls else [])
    head = " | ".join(f"{c + ' inst/s':>16} {'MB/s':>6}" for c in cols)
    print(f"{'size':6} {'n':>4} {'MB/inst':>7} | {head} | {'time dicomai/orthanc':>20} "
          f"{'rate dicomai/null':>17} {'rate storescp/dicomai':>21}"
          + (f" {'rate tls/dicomai':>16}" if args.tls else ""))
    for label, count, mb_each, med in rows:
        cells = " | ".join(f"{count / med[c]:16.1f} {count * mb_each / med[c]:6.1f}" for c in cols)
        print(f"{label:6} {count:4d} {mb_each:7.3f} | {cells} | {med['dicomai'] / med['orthanc']:20.2f} "
              f"{med['null'] / med['dicomai']:17.2f} {med['dicomai'] / med['storescp']:21.2f}"
              + (f" {med['dicomai'] / med['tls']:16.2f}" if args.tls else ""))

if __name__ == "__main__":
    main()

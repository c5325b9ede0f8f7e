"""DICOM TLS: the listener's TLS port, TLS destinations, and the preflight of keys and certificates.

The certificates are made by the tests with the openssl command line tool: a CA, the node's
and Orthanc's server certificates (naming 127.0.0.1 and localhost), client certificates of
two subjects, and one that expired in 2020 (``openssl ca -startdate/-enddate``: ``-days``
cannot go back in time). Peers are real: dcmtk's storescu/echoscu with ``+tls``, Orthanc with
``DicomTlsEnabled``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomai.config import AccessConfig, AllowedCaller, Destination, Settings, TlsConfig, subject_key
from dicomai.errors import ConfigError
from dicomai.net import tls
from tests import pdu
from tests.helpers import TIBIA, Node, Orthanc, dcmtk, free_port, make_study, missing, pydicom_data, storescu
from tests.test_hardening import _rows

MODALITY_SUBJECT = "CN=modality1, O=dicomai test"


@dataclass(frozen=True)
class Pki:
    """Files made by :func:`pki`: ``<name>.pem`` and ``<name>.key`` for each certificate."""

    root: Path

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.cert("ca")


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _issue(root: Path, name: str, subject: str, start: str, end: str, server: bool) -> None:
    """A P-256 key and a certificate signed by the CA, valid from ``start`` to ``end``."""
    ext = root / f"{name}.ext"
    lines = ["basicConstraints = CA:FALSE", "extendedKeyUsage = serverAuth, clientAuth"]
    if server:
        lines.append("subjectAltName = DNS:localhost, IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=root)
    _openssl("ca", "-batch", "-config", "ca.cnf", "-in", f"{name}.csr", "-out", f"{name}.pem",
             "-startdate", start, "-enddate", end, "-extfile", ext.name, "-notext", cwd=root)
    (root / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and the certificates the tests present."""
    if shutil.which("openssl") is None:
        missing("the openssl command line tool (apt-get install openssl)")
    root = tmp_path_factory.mktemp("pki")
    (root / "index.txt").write_text("")
    (root / "serial").write_text("1000\n")
    (root / "ca.cnf").write_text(
        "[ca]\ndefault_ca = ca_default\n[ca_default]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ncertificate = ca.pem\nprivate_key = ca.key\ndefault_md = sha256\n"
        "policy = any\nunique_subject = no\n"
        "[any]\ncommonName = supplied\norganizationName = optional\n")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/O=dicomai test/CN=test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=root)
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(days=1)).strftime("%Y%m%d%H%M%SZ")
    later = (now + dt.timedelta(days=20)).strftime("%Y%m%d%H%M%SZ")
    soon = (now + dt.timedelta(days=5)).strftime("%Y%m%d%H%M%SZ")
    _issue(root, "node", "/O=dicomai test/CN=dicomai node", start, later, server=True)
    _issue(root, "orthanc", "/O=dicomai test/CN=orthanc", start, later, server=True)
    _issue(root, "modality", "/O=dicomai test/CN=modality1", start, later, server=False)
    _issue(root, "stranger", "/O=dicomai test/CN=stranger", start, later, server=False)
    _issue(root, "soon", "/O=dicomai test/CN=soon", start, soon, server=True)
    _issue(root, "expired", "/O=dicomai test/CN=expired", "20200101000000Z", "20200201000000Z",
           server=True)
    return Pki(root)


def _tls_config(path: Path, pki: Pki, extra: str = "", client_certificates: str = "required",
                callers: str = "") -> Path:
    path.write_text(f"""
[tls]
enabled = true
port = {free_port()}
certificate = "{pki.cert('node')}"
private_key = "{pki.key('node')}"
ca_certificates = "{pki.ca}"
client_certificates = "{client_certificates}"
{extra}
{callers}
""")
    return path


def _tls_port(node: Node) -> int:
    """The node's TLS port, once it listens there (it logs node.listening after both ports)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for event in node.log_events():
            if event.get("event") == "node.listening":
                return int(event["tls_port"])
        time.sleep(0.05)
    raise AssertionError(f"the node did not log node.listening:\n{node.log()}")


def _tls_store(port: int, pki: Pki, files: list[Path], who: str | None = "modality",
               aet: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    flags = ["+tls", str(pki.key(who)), str(pki.cert(who))] if who else ["+tla"]
    return storescu(port, files, aet=aet, extra=[*flags, "+cf", str(pki.ca)])


# -- pure parts -------------------------------------------------------------------------
def test_subject_matching_ignores_order_and_name_case() -> None:
    """cert_subject matches the presented subject whatever the attribute order; another CN fails."""
    assert subject_key("CN=modality1, O=dicomai test") == subject_key("o=dicomai test,CN=modality1")
    caller = AllowedCaller(ae_title="MODALITY", cert_subject=MODALITY_SUBJECT)
    assert caller.presents("O=dicomai test, CN=modality1")
    assert not caller.presents("O=dicomai test, CN=stranger") and not caller.presents(None)
    access = AccessConfig(allowed_callers=[caller])
    assert access.check("MODALITY", "127.0.0.1", "DICOMAI", "DICOMAI", MODALITY_SUBJECT) is None
    assert access.check("MODALITY", "127.0.0.1", "DICOMAI", "DICOMAI") == (
        "calling AE title not allowed with this client certificate")
    with pytest.raises(ValueError, match="not a subject"):
        AllowedCaller(ae_title="X", cert_subject="modality1")


def test_config_names_missing_tls_files() -> None:
    """[tls] enabled needs a certificate, a key and (when clients must present one) the CAs."""
    with pytest.raises(ValueError, match="certificate and private_key"):
        TlsConfig(enabled=True)
    with pytest.raises(ValueError, match="needs ca_certificates"):
        TlsConfig(enabled=True, certificate=Path("c"), private_key=Path("k"))
    with pytest.raises(ValueError, match="tls.port must differ"):
        Settings.model_validate({"tls": {"enabled": True, "port": 11112, "certificate": "c",
                                         "private_key": "k", "client_certificates": "none"}})
    with pytest.raises(ValueError, match="need tls = true"):
        Destination(name="p", ae_title="P", host="h", port=1, server_name="pacs")


def test_certificate_validity_read_from_pem(pki: Pki) -> None:
    """read_certificates gives the subject and dates openssl put in the files."""
    (expired,) = tls.read_certificates(pki.cert("expired"))
    assert expired.subject == "CN=expired, O=dicomai test"  # in the policy's order
    assert expired.not_after == dt.datetime(2020, 2, 1, tzinfo=dt.UTC)
    (node,) = tls.read_certificates(pki.cert("node"))
    assert 19 < node.days_left(dt.datetime.now(dt.UTC)) < 21


def test_server_context_is_tls12_or_later(pki: Pki, tmp_path: Path) -> None:
    """The listener refuses TLS 1.1 and asks for client certificates as configured."""
    cfg = TlsConfig(enabled=True, certificate=pki.cert("node"), private_key=pki.key("node"),
                    ca_certificates=pki.ca)
    ctx = tls.server_context(cfg)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("organizationName", "dicomai test"),),
                                                           (("commonName", "test CA"),))]
    bad = TlsConfig(enabled=True, certificate=pki.cert("node"), private_key=pki.key("orthanc"),
                    ca_certificates=pki.ca)
    with pytest.raises(ConfigError, match="tls.certificate.*cannot load"):
        tls.server_context(bad)


# -- the listener -----------------------------------------------------------------------
@pytest.mark.integration
def test_storescu_with_client_certificate_stores(node_factory: type[Node], tmp_path: Path,
                                                 pki: Pki) -> None:
    """storescu +tls with the allowed subject stores over TLS; the same AE title over plain TCP
    or with another trusted certificate is rejected, because the entry names a subject."""
    callers = f"""
[[access.allowed_callers]]
ae_title = "MODALITY"
cert_subject = "{MODALITY_SUBJECT}"
"""
    node = node_factory(data_dir=tmp_path / "data",
                        config=_tls_config(tmp_path / "n.toml", pki, callers=callers)).start()
    port = _tls_port(node)
    study_uid, files = make_study([pydicom_data("CT_small.dcm")], tmp_path / "study", copies=2)
    out = _tls_store(port, pki, files)
    assert out.returncode == 0, out.stderr
    assert [s["study_instance_uid"] for s in node.studies()] == [study_uid]
    assert storescu(node.port, files, aet="MODALITY").returncode != 0
    assert _tls_store(port, pki, files, who="stranger").returncode != 0
    rows = _rows(node.data_dir, 3)
    assert rows[0][:2] == ("MODALITY", 1)
    assert rows[1:] == [("MODALITY", 0, "rejected",
                         "calling AE title not allowed with this client certificate")] * 2
    events = [e for e in node.log_events() if e.get("event") == "node.listening"]
    assert events[0]["tls_port"] == port


@pytest.mark.integration
def test_clients_failing_tls_are_rejected_and_audited(node_factory: type[Node], tmp_path: Path,
                                                      pki: Pki) -> None:
    """A client without a certificate and a plain-TCP client on the TLS port fail the handshake,
    each audited as a rejected association; a silent plain connection is dropped after
    node.acse_timeout_s and holds no slot meanwhile: a TLS client still stores."""
    node = node_factory(data_dir=tmp_path / "data", config=_tls_config(tmp_path / "n.toml", pki),
                        env_extra={"DICOMAI_NODE__MAX_ASSOCIATIONS": "1",
                                   "DICOMAI_NODE__ACSE_TIMEOUT_S": "3"}).start()
    port = _tls_port(node)
    _, files = make_study([pydicom_data("CT_small.dcm")], tmp_path / "study")
    assert _tls_store(port, pki, files, who=None).returncode != 0  # +tla: no certificate
    assert storescu(port, files).returncode != 0  # plain DICOM on the TLS port
    rows = _rows(node.data_dir, 2)
    assert [r[:3] for r in rows] == [("", 0, "rejected")] * 2
    assert "TLS handshake failed" in (rows[0][3] or "") and "certificate" in (rows[0][3] or "")
    assert "TLS handshake failed" in (rows[1][3] or "")
    rejected = [e for e in node.log_events() if e.get("event") == "tls.rejected"]
    assert len(rejected) == 2

    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(10)
        started = time.monotonic()
        out = _tls_store(port, pki, files)  # not held up behind the silent one
        assert out.returncode == 0, out.stderr
        assert silent.recv(1) == b""  # the node hung up on it
        assert 2 < time.monotonic() - started < 8
    assert _rows(node.data_dir, 3)[2][:2] == ("MODALITY", 1)


@pytest.mark.integration
def test_pdus_in_one_tls_record_are_all_read(node_factory: type[Node], tmp_path: Path, pki: Pki) -> None:
    """A C-ECHO and the A-RELEASE-RQ sent in one TLS record are both answered at once (the
    release is not left in TLS's buffer behind the guard until the network timeout)."""
    node = node_factory(data_dir=tmp_path / "data",
                        config=_tls_config(tmp_path / "n.toml", pki)).start()
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.cert("modality"), pki.key("modality"))
    with socket.create_connection(("127.0.0.1", _tls_port(node)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(pdu.associate_rq())
        assert pdu.read_pdu(sock).pdu_type == pdu.A_ASSOCIATE_AC
        sock.sendall(pdu.p_data(1, pdu.echo_command()) + pdu.release_rq())
        assert pdu.read_pdu(sock).pdu_type == pdu.P_DATA_TF
        assert pdu.read_pdu(sock).pdu_type == pdu.A_RELEASE_RP


@pytest.mark.integration
def test_loose_key_permissions_stop_the_node(tmp_path: Path, pki: Pki) -> None:
    """A private key readable by group or others: `serve` exits 2 with one line naming it."""
    key = tmp_path / "node.key"
    shutil.copy(pki.key("node"), key)
    key.chmod(0o640)
    cfg = _tls_config(tmp_path / "n.toml", pki).read_text().replace(str(pki.key("node")), str(key))
    (tmp_path / "n.toml").write_text(cfg)
    node = Node(data_dir=tmp_path / "data", config=tmp_path / "n.toml")
    out = subprocess.run(["timeout", "60", *_serve(node)], env=node.env(), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls.private_key" in lines[0] and "mode 0640" in lines[0], lines
    assert not (tmp_path / "data").exists()  # refused before touching the data directory


def _serve(node: Node) -> list[str]:
    import sys

    return [sys.executable, "-m", "dicomai", "serve", "--config", str(node.config)]


# -- destinations -----------------------------------------------------------------------
def _orthanc_tls(tmp_path: Path, pki: Pki, node_port: int) -> Orthanc:
    """Orthanc whose DICOM port speaks TLS only and requires a client certificate."""
    return Orthanc(tmp_path / "orthanc", {}, extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.cert("orthanc")),
        "DicomTlsPrivateKey": str(pki.key("orthanc")), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"dicomai": {"AET": "DICOMAI", "Host": "127.0.0.1", "Port": node_port,
                                        "UseDicomTls": True}},
    })


def _destination(pki: Pki, port: int, server_name: str = "127.0.0.1") -> str:
    return f"""
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
outputs = ["sr"]
tls = true
ca_certificates = "{pki.ca}"
client_certificate = "{pki.cert('node')}"
client_key = "{pki.key('node')}"
server_name = "{server_name}"
"""


@pytest.mark.integration
def test_results_reach_orthanc_over_tls(node_factory: type[Node], tmp_path: Path, pki: Pki) -> None:
    """A study sent to the node comes back as an SR in Orthanc, whose DICOM port speaks TLS only
    and requires the node's client certificate."""
    node_port = free_port()
    orthanc = _orthanc_tls(tmp_path, pki, node_port)
    cfg = tmp_path / "n.toml"
    cfg.write_text(_destination(pki, orthanc.dicom_port) + "\n[outbox]\npoll_interval_s = 0.5\n")
    node = node_factory(data_dir=tmp_path / "data", config=cfg, port=node_port)
    orthanc.start()
    try:
        node.start()
        uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "study", body_part=TIBIA)
        assert storescu(node.port, files).returncode == 0
        deadline = time.monotonic() + 120
        rows: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            rows = json.loads(node.cli("outbox", "list", "--json").stdout)
            if rows and all(r["state"] == "sent" for r in rows):
                break
            time.sleep(0.5)
        assert rows and all(r["state"] == "sent" for r in rows), rows
        modalities = {s["MainDicomTags"]["Modality"] for s in orthanc.study_series(uid)}
        assert modalities == {"SR"}
    finally:
        orthanc.stop()


# -- dicomai check ----------------------------------------------------------------------
@pytest.mark.integration
def test_check_fails_on_expired_certificate(tmp_path: Path, pki: Pki) -> None:
    """`dicomai check` fails with a line naming the expired certificate, warns for one that
    ends within 30 days (FAIL under 14) and checks the key's permissions."""
    cfg = _tls_config(tmp_path / "n.toml", pki).read_text()
    for name, result, words in (("expired", "FAIL", "expired on 2020-02-01"),
                                ("soon", "FAIL", "days left"), ("node", "WARN", "days left")):
        shutil.copy(pki.key(name), tmp_path / f"{name}.key")
        (tmp_path / f"{name}.key").chmod(0o644 if name == "node" else 0o600)
        (tmp_path / "c.toml").write_text(cfg.replace(str(pki.cert("node")), str(pki.cert(name)))
                                         .replace(str(pki.key("node")), str(tmp_path / f"{name}.key")))
        node = Node(data_dir=tmp_path / "data", config=tmp_path / "c.toml")
        out = node.cli("check", check=False)
        assert out.returncode == 1, out.stdout
        (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("tls.certificate")]
        assert result in line and words in line, line
        if name == "node":
            (key_line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("tls.private_key")]
            assert "FAIL" in key_line and "0644" in key_line, key_line


@pytest.mark.integration
def test_echoscu_over_tls(node_factory: type[Node], tmp_path: Path, pki: Pki) -> None:
    """dcmtk echoscu +tls is answered on the TLS port while the plain port keeps working."""
    node = node_factory(data_dir=tmp_path / "data",
                        config=_tls_config(tmp_path / "n.toml", pki)).start()
    base = [dcmtk("echoscu"), "-aec", "DICOMAI", "127.0.0.1"]
    tls_flags = ["+tls", str(pki.key("modality")), str(pki.cert("modality")), "+cf", str(pki.ca)]
    assert subprocess.run([*base[:1], *tls_flags, *base[1:], str(_tls_port(node))],
                          capture_output=True).returncode == 0
    assert subprocess.run([*base, str(node.port)], capture_output=True).returncode == 0


@pytest.mark.integration
def test_check_echoes_tls_destination(tmp_path: Path, pki: Pki) -> None:
    """`dicomai check` and `dicomai echo` echo a TLS destination over TLS; a server name its
    certificate does not carry fails the echo with a line naming it (the host name check is on)."""
    orthanc = _orthanc_tls(tmp_path, pki, free_port()).start()
    try:
        for name, ok in (("127.0.0.1", True), ("pacs.example.org", False)):
            (tmp_path / "c.toml").write_text(_destination(pki, orthanc.dicom_port, server_name=name))
            node = Node(data_dir=tmp_path / "data", config=tmp_path / "c.toml")
            checks = {c["item"]: c for c in json.loads(node.cli("check", "--json", check=False).stdout)}
            echo = checks["destination pacs"]
            assert echo["ok"] is ok, echo
            assert "over TLS" in echo["detail"] and name in echo["detail"], echo
            echoed = node.cli("echo", "pacs", check=False)  # the admin's own C-ECHO, over TLS too
            assert echoed.returncode == (0 if ok else 1) and "over TLS" in echoed.stdout, echoed
    finally:
        orthanc.stop()

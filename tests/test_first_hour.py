"""A new admin's first hour: the node's commands as the README gives them, failing cleanly.

Each test is one thing an operator does (run a command from another directory, start a second
node, pipe ``--json`` into a script) and checks the documented outcome: the right data, or one
line on stderr and the documented exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

import dicomai.cli
import dicomai.config
from tests.helpers import Node, dcmtk, make_study, shared_file


def _serve(node: Node, **env: str) -> subprocess.CompletedProcess[str]:
    """``dicomai serve`` as ``node`` would run, expected to stop by itself."""
    return subprocess.run([sys.executable, "-m", "dicomai", "serve"], env={**node.env(), **env},
                          capture_output=True, text=True, timeout=120)


def test_commands_find_the_system_config_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With /etc/dicomai/dicomai.toml in place, `dicomai studies list` run anywhere reads the
    node's database, not a new one in the current directory."""
    system = tmp_path / "etc" / "dicomai.toml"
    system.parent.mkdir()
    system.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    monkeypatch.setattr(dicomai.config.settings, "SYSTEM_CONFIG", system)
    for name in [k for k in os.environ if k.startswith("DICOMAI_")]:
        monkeypatch.delenv(name)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert dicomai.cli.main(["db", "upgrade"]) == 0
    assert dicomai.cli.main(["studies", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == []
    assert (tmp_path / "var" / "audit.sqlite3").exists() and not list(elsewhere.iterdir())


@pytest.mark.integration
def test_second_serve_on_one_data_dir_stops(node: Node) -> None:
    """A second `dicomai serve` on a data directory in use exits 2 with one line; the first
    node keeps running."""
    second = Node(data_dir=node.data_dir)
    out = _serve(second)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [f"dicomai: data directory {node.data_dir.resolve()} is in use by "
                                       f"another dicomai serve (pid {node.proc.pid if node.proc else 0})"]
    assert node.proc is not None and node.proc.poll() is None


@pytest.mark.integration
def test_serve_on_a_taken_port_stops(tmp_path: Path) -> None:
    """`dicomai serve` on a port another process listens on exits 2 with one line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve(Node(data_dir=tmp_path / "data", port=port))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [f"dicomai: port {port} on 127.0.0.1 is in use (another process "
                                       "listens there; set node.port or stop it)"]
    assert "Traceback" not in out.stdout


@pytest.mark.integration
def test_json_while_receiving_pipes_into_a_script(node_factory: type[Node], tmp_path: Path) -> None:
    """`studies list --json` on a running node's database is JSON on stdout alone; the table
    shows the accession number and '-' for the grade of a study still receiving."""
    node = node_factory(data_dir=tmp_path / "data", env_extra={
        "DICOMAI_STUDIES__QUIET_PERIOD_S": "600", "DICOMAI_STUDIES__ON_RELEASE": "false",
        "DICOMAI_LOGGING__LEVEL": "debug"}).start()
    study_uid, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s")
    for f in files:
        ds = dcmread(f)
        ds.AccessionNumber = "ACC-4711"
        ds.save_as(f)
    sent = subprocess.run([dcmtk("dcmsend"), "-aec", "DICOMAI", "127.0.0.1", str(node.port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    out = node.cli("studies", "list", "--json")
    (row,) = json.loads(out.stdout)
    assert (row["study_instance_uid"], row["state"], row["grade"]) == (study_uid, "receiving", None)
    assert row["accession_number"] == "ACC-4711"
    header, line = node.cli("studies", "list").stdout.splitlines()
    assert header.split()[:4] == ["study_instance_uid", "accession_number", "state", "grade"]
    assert line.split()[:5] == [study_uid, "ACC-4711", "receiving", "-", "-"]
    assert "None" not in line

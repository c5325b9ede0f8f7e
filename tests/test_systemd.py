"""The shipped systemd unit passes `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze finds no error in systemd/dicomai.service (binary path substituted)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (optional check)")
    exe = Path(sys.executable).with_name("dicomai")
    if not exe.exists():
        pytest.skip("dicomai console script not installed next to the interpreter")
    unit = (REPO / "systemd" / "dicomai.service").read_text()
    assert "Type=notify" in unit and "ProtectSystem=strict" in unit
    path = tmp_path / "dicomai.service"
    path.write_text(unit.replace("/opt/dicomai/venv/bin/dicomai", str(exe)))
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "dicomai.service" not in out.stderr, out.stderr


def test_unit_config_and_readme_agree() -> None:
    """The unit, the shipped configuration and the README's recipe name one data directory and
    one configuration file, the one every command reads by default, readable by the unit's user."""
    from dicomai.config import SYSTEM_CONFIG, load_settings

    unit = (REPO / "systemd" / "dicomai.service").read_text()
    assert "DICOMAI_NODE__DATA_DIR" not in unit  # commands run by hand would not see it
    assert "StateDirectory=dicomai\n" in unit and "WorkingDirectory=/var/lib/dicomai\n" in unit
    shipped = load_settings(REPO / "config" / "dicomai.toml", environ={})
    assert shipped.data_dir == Path("/var/lib/dicomai")
    assert f"dicomai serve --config {SYSTEM_CONFIG}\n" in unit
    assert "User=dicomai\n" in unit and "Group=dicomai\n" in unit
    readme = (REPO / "README.md").read_text()
    assert f"sudo install -D -m 0640 -o root -g dicomai config/dicomai.toml {SYSTEM_CONFIG}\n" in readme
    assert "sudo -u dicomai /opt/dicomai/venv/bin/dicomai studies list\n" in readme

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

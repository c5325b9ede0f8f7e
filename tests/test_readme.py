"""The README's set-up commands, exactly as written, in a fresh clone of the repository.

The first (install and serve) is run in a clone and fed a mixed-syntax study with dcmtk's
``dcmsend``, as the README's walk-through does; the second (the test command) is not run from
inside the tests: ``.ci/run`` runs it, and the test checks that it runs that very line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import IN_CI, REPO, dcmtk, free_port, make_study, pydicom_data, shared_file

RUN = IN_CI or os.environ.get("DICOMAI_TEST_README") == "1"
DEFAULT_PORT = 11112


def setup_commands() -> list[str]:
    """The ```sh blocks of the README's "Set up" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)


def test_setup_commands_are_one_line_each_and_ci_runs_the_test_command() -> None:
    """Install-and-serve and the test command are one line each; .ci/run runs the latter verbatim."""
    install, tests = setup_commands()[:2]
    assert "\n" not in install and install.endswith("dicomai serve")
    assert "\n" not in tests and "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the set-up command exited with {proc.returncode}:\n"
                                 + log.read_text(errors="replace")[-4000:])
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what} not within {timeout}s:\n" + log.read_text(errors="replace")[-4000:])


@pytest.mark.integration
def test_install_and_serve_in_a_fresh_clone(tmp_path: Path) -> None:
    """In an empty folder: clone, run the README's install-and-serve line as written, send a
    mixed-syntax study with dcmsend, see it processed with its SC and SR kept."""
    if not RUN:
        pytest.skip("DICOMAI_TEST_README=1 runs it (pip-installs the node in a clone: 1-2 minutes)")
    install = setup_commands()[0]
    echoscu, dcmsend = dcmtk("echoscu"), dcmtk("dcmsend")
    study_uid, _ = make_study([pydicom_data("RG3_UNCR.dcm"), shared_file("RG2_JPLL.dcm")],
                              tmp_path / "study")
    clone = tmp_path / "empty" / "dicomai"
    clone.parent.mkdir()
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True,
                   timeout=300)
    # A newcomer's environment: no DICOMAI_* settings, no configuration file named.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMAI_")}
    port = DEFAULT_PORT
    if _port_taken(port):  # another node on this machine; the command text stays verbatim
        port = free_port()
        env["DICOMAI_NODE__PORT"] = str(port)
    log = tmp_path / "setup.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", install], cwd=clone, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    dicomai = [str(clone / ".venv" / "bin" / "dicomai")]

    def studies() -> list[dict[str, Any]]:
        run = subprocess.run([*dicomai, "studies", "list", "--json"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)  # type: ignore[no-any-return]

    try:
        _wait("the node answering C-ECHO", lambda: subprocess.run(
            [echoscu, "-aec", "DICOMAI", "127.0.0.1", str(port)], capture_output=True).returncode == 0,
            900, proc, log)
        sent = subprocess.run([dcmsend, "-aec", "DICOMAI", "127.0.0.1", str(port), "--scan-directories",
                               str(tmp_path / "study")], capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        (row,) = _wait("the study processed", lambda: [r for r in studies() if r["state"] == "processed"],
                       180, proc, log)
        assert (row["study_instance_uid"], row["instances"]) == (study_uid, 2)
        shown = subprocess.run([*dicomai, "studies", "show", study_uid, "--json"], cwd=clone, env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        kept = json.loads(shown.stdout)["results"]
        assert {"sc", "sr"} <= {o["kind"] for o in kept}, kept  # and whatever else results.keep names
        assert all((clone / "dicomai-data" / o["path"]).is_file() for o in kept), kept
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_readme_alert_rules_are_valid_prometheus_rules(tmp_path: Path) -> None:
    """The alert rules the README gives admins load in Prometheus (promtool) and name only
    metrics the node exports."""
    import shutil

    from tests.helpers import missing

    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt-get install prometheus)")
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(groups:.*?)```", text, re.DOTALL)
    rules = tmp_path / "rules.yml"
    rules.write_text(block)
    out = subprocess.run([str(promtool), "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = (REPO / "dicomai" / "ops" / "metrics.py").read_text()
    for name in set(re.findall(r"\b(dicomai_[a-z_]+)", block)):
        assert f'"{name.removesuffix("_total")}"' in metrics, name

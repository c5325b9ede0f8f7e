"""Tests of the admin command line against a node that received real studies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Node, make_study, shared_file, storescu


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomai", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_help_lists_commands() -> None:
    """`dicomai --help` shows the command tree."""
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "db", "echo", "studies", "config"):
        assert cmd in out.stdout


def test_bad_config_exits_2_naming_key(tmp_path: Path) -> None:
    """A bad configuration value stops any command with exit code 2 and the key's name."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = -5\n")
    out = _run("config", "show", "--config", str(cfg))
    assert out.returncode == 2
    assert "node.port" in out.stderr


def test_config_show_json_applies_layers(tmp_path: Path) -> None:
    """config show --json prints the effective configuration with env and flags applied."""
    env = {"DICOMAI_NODE__PORT": "4242", "DICOMAI_DATABASE__URL": "postgresql+psycopg://a:pw@h/d",
           "PATH": "/usr/bin:/bin"}
    out = _run("config", "show", "--json", "--data-dir", str(tmp_path), env=env)
    data = json.loads(out.stdout)
    assert data["node"]["port"] == 4242
    assert data["node"]["data_dir"] == str(tmp_path)
    assert "pw" not in out.stdout


@pytest.mark.integration
def test_studies_list_and_show(node: Node, tmp_path: Path) -> None:
    """studies list filters by state/since and prints JSON; show gives instances and events."""
    study_uid, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s", copies=3)
    assert storescu(node.port, files).returncode == 0
    node.wait_state(study_uid, "processed")
    rows = json.loads(node.cli("studies", "list", "--json", "--state", "processed", "--since", "1h").stdout)
    assert len(rows) == 1
    assert {"study_instance_uid", "state", "instances", "received_at"} <= rows[0].keys()
    assert (rows[0]["study_instance_uid"], rows[0]["instances"]) == (study_uid, 3)
    assert json.loads(node.cli("studies", "list", "--json", "--state", "receiving").stdout) == []
    assert json.loads(node.cli("studies", "list", "--json", "--since", "2000-01-01").stdout)
    table = node.cli("studies", "list").stdout
    assert study_uid in table and "processed" in table
    shown = node.cli("studies", "show", study_uid).stdout
    assert "instance.stored" in shown and "study.processed" in shown
    missing = node.cli("studies", "show", "1.2.3.999", check=False)
    assert missing.returncode == 1


@pytest.mark.integration
def test_echo_configured_destination(node: Node, tmp_path: Path) -> None:
    """`dicomai echo NAME` C-ECHOes a [[destinations]] entry; a refusal exits 1."""
    cfg = tmp_path / "peers.toml"
    cfg.write_text(f'[[destinations]]\nname = "self"\nae_title = "DICOMAI"\nhost = "127.0.0.1"\n'
                   f'port = {node.port}\n[[destinations]]\nname = "wrong"\nae_title = "NOBODY"\n'
                   f'host = "127.0.0.1"\nport = {node.port}\n')
    ok = node.cli("echo", "self", "--config", str(cfg))
    assert "status 0x0000" in ok.stdout
    bad = node.cli("echo", "wrong", "--config", str(cfg), check=False)
    assert bad.returncode == 1 and "rejected" in bad.stdout


def test_train_compare_reads_the_packages_figures() -> None:
    """`train compare` (no PyTorch needed): the shipped package's own figures, its parameter count
    from the ONNX graph and a measured latency."""
    import onnx
    from onnx import numpy_helper

    from dicomai.model.package import load_package
    from dicomai.node import default_model_dir

    shipped = default_model_dir()
    assert shipped is not None
    run = subprocess.run([sys.executable, "-m", "dicomai", "train", "compare", str(shipped),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout)
    manifest = load_package(shipped).manifest
    assert row["package"] == f"{manifest.name} {manifest.version}"
    assert row["auroc"] == manifest.metrics["test"]["auroc"]
    members = manifest.training.get("members", [])  # an ensemble (`train ensemble`) names its members
    assert row["backbone"] == ("ensemble of " + " + ".join(m["backbone"] for m in members) if members
                               else manifest.training["backbone"])
    graph = onnx.load(str(shipped / "model.onnx")).graph
    params = sum(numpy_helper.to_array(t).size for t in graph.initializer)
    assert row["params_m"] * 1e6 == pytest.approx(params)
    assert row["latency_ms"] > 0
    table = subprocess.run([sys.executable, "-m", "dicomai", "train", "compare", str(shipped)],
                           capture_output=True, text=True, timeout=300).stdout.splitlines()
    assert len(table) == 3 and table[2].startswith(f"| {manifest.name} {manifest.version} |")
    assert f"{manifest.metrics['test']['auroc']:.3f}" in table[2]
    # the intervals beside the target figures, where the package's evaluation has them
    t = manifest.metrics["test"]
    hs, pg = t["high_sensitivity"], t["pointing_game_ci95"]
    assert (f"| {hs['sensitivity']:.3f} [{hs['sensitivity_ci95'][0]:.3f}-{hs['sensitivity_ci95'][1]:.3f}] / "
            f"{hs['specificity']:.3f} |") in table[2]
    pointing = f"| {t['pointing_game']:.3f} [{pg[0]:.3f}-{pg[1]:.3f}] ({t['pointing_game_15px']:.3f}) |"
    assert pointing in table[2]


def test_plugin_that_cannot_import_names_its_extra(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A plug-in command group whose module fails to import still answers: one line, exit 2."""
    from importlib.metadata import EntryPoint

    import dicomai.cli

    broken = EntryPoint("train", "dicomai_test_absent_dependency.cli:register", dicomai.cli.PLUGIN_GROUP)
    monkeypatch.setattr(dicomai.cli, "entry_points", lambda group: [broken])
    assert "train" in dicomai.cli.build_parser().format_help()
    assert dicomai.cli.main(["train", "fit", "data", "out"]) == 2
    assert capsys.readouterr().err == ("dicomai: the training commands need the train extra: "
                                       "pip install 'dicomai[train]'\n")


def test_train_without_the_extra_exits_2() -> None:
    """Without PyTorch, a training command says which extra it needs and exits 2; --help works."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed: the training commands run")
    assert "fit" in _run("train", "--help").stdout
    out = _run("train", "fit", "data", "out")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "dicomai: the training commands need the train extra: pip install 'dicomai[train]'"]

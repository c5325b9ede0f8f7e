"""Tests of the admin command line against a node that received real studies."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, Node, make_study, shared_file, storescu


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
    # probabilities to 3 decimals, in the table and in JSON alike
    assert re.search(r"^probability +(\d\.\d{3}|-)$", shown, re.MULTILINE), shown
    data = node.study(study_uid)
    for p in [data, *data["predictions"]]:
        assert p["probability"] is None or round(p["probability"], 3) == p["probability"]
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


def _clean_env(**extra: str) -> dict[str, str]:
    """The process environment without DICOMAI_* settings or a configuration file, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMAI_")}
    return {**env, **extra}


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_help_shows_the_defaults() -> None:
    """Every option with a default says it in --help; serve names its settings' defaults."""
    import dicomai.cli

    for parser in _parsers(dicomai.cli.build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:  # noqa: SLF001
            if action.default not in (None, False, argparse.SUPPRESS, []) and action.help:
                assert f"(default: {action.default})" in text, (parser.prog, action.dest)
    serve = " ".join(_run("serve", "--help").stdout.split())
    assert "(node.port, default: 11112)" in serve and "(node.host, default: 0.0.0.0)" in serve


@pytest.mark.parametrize(("args", "says"), [
    (["--grade", "bogus"], "choose from positive, doubtful, negative, not_analysed, failed"),
    (["--state", "bogus"], "choose from receiving, processing, processed, failed"),
    (["--since", "yesterday"], "yesterday is neither an ISO date/time"),
    (["--limit", "ten"], "invalid int value: ten"),
])
def test_bad_flag_value_is_one_usage_line(args: list[str], says: str) -> None:
    """A bad flag value exits 2 with one line giving the allowed values, before any database."""
    out = _run("studies", "list", *args, env=_clean_env())
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("dicomai studies list: argument") and says in line.replace("'", ""), line


def test_config_show_round_trips_as_toml(tmp_path: Path) -> None:
    """`config show` prints TOML with every key under its own table, no null and no derived key;
    fed back with --config it gives the same text; unset keys say what is used instead."""
    env = _clean_env(
        DICOMAI_DATABASE__URL="postgresql+psycopg://u:secret@db/x",
        DICOMAI_ACCESS__ALLOWED_CALLERS='[{"ae_title": "PACS", "hosts": ["10.0.0.0/24"]}]',
        DICOMAI_DESTINATIONS='[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}]')
    first = _run("config", "show", "--data-dir", str(tmp_path), env=env)
    assert first.returncode == 0, first.stderr
    text = first.stdout
    data = tomllib.loads(text)
    assert "null" not in text and "effective_url" not in text and "secret" not in text
    assert data["access"]["allowed_callers"] == [{"ae_title": "PACS", "hosts": ["10.0.0.0/24"]}]
    assert data["destinations"][0]["name"] == "pacs" and data["node"]["data_dir"] == str(tmp_path)
    assert "path" not in data["model"] and "# path unset: the model shipped with dicomai" in text
    manifest = json.loads((REPO / "dicomai" / "models" / "default" / "model.json").read_text())
    assert f"body_parts = []  # empty: the model's own list, {', '.join(manifest['body_parts'])}" in text
    shown = tmp_path / "shown.toml"
    shown.write_text(text)
    again = _run("--config", str(shown), "config", "show", env=_clean_env())
    assert again.returncode == 0, again.stderr
    assert again.stdout == text


@pytest.mark.parametrize(("env", "args", "says"), [
    ({}, ["--config", "/tmp"], "configuration error: /tmp: is a directory, not a configuration file"),
    ({}, ["--config", "/nonexistent/dicomai.toml"],
     "configuration error: /nonexistent/dicomai.toml: configuration file not found"),
    ({"DICOMAI_CONFIG": "/nonexistent/x.toml"}, [],
     "configuration error: /nonexistent/x.toml: configuration file not found"),
    ({"DICOMAI_NODE__PORT": "x"}, [], "configuration error: node.port (from environment variable "
     "DICOMAI_NODE__PORT): Input should be a valid integer"),
])
def test_configuration_error_is_one_line_on_stderr(env: dict[str, str], args: list[str], says: str) -> None:
    """A configuration error is printed once, on stderr (stdout stays clean), with exit code 2."""
    out = _run(*args, "studies", "list", "--json", env=_clean_env(**env))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [f"dicomai: {says}"] or out.stderr.startswith(f"dicomai: {says}")
    assert len(out.stderr.splitlines()) == 1


def test_unreadable_config_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration file the user may not read (the systemd recipe's 0640 as another user)
    gives one line naming it and exit 2, not a traceback."""
    import dicomai.cli

    cfg = tmp_path / "dicomai.toml"
    cfg.write_text("[node]\n")
    cfg.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse it the way the kernel would
        real_open = Path.open

        def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == cfg:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    for name in [k for k in os.environ if k.startswith("DICOMAI_")]:
        monkeypatch.delenv(name)
    assert dicomai.cli.main(["--config", str(cfg), "config", "show"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"dicomai: configuration error: {cfg}: cannot read the configuration file")
    assert len(out.err.splitlines()) == 1


def test_postgres_url_without_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A PostgreSQL database.url without psycopg installed names the extra, exit 2, one line."""
    import dicomai.cli

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ModuleNotFoundError
    for name in [k for k in os.environ if k.startswith("DICOMAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DICOMAI_DATABASE__URL", "postgresql+psycopg://u@127.0.0.1:1/x")
    assert dicomai.cli.main(["--data-dir", str(tmp_path), "db", "current"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["dicomai: a postgresql+psycopg:// database.url needs the postgres extra: "
                                "pip install 'dicomai[postgres]'"]


def test_tools_variables_do_not_break_commands() -> None:
    """DICOMAI_MOBILENET_V2_TFLITE (documented for training) and the tests' variables are not
    settings: every command still runs."""
    env = _clean_env(DICOMAI_MOBILENET_V2_TFLITE="/srv/w.tflite", DICOMAI_TEST_DATA="/srv/data")
    out = _run("config", "show", "--json", env=env)
    assert out.returncode == 0, out.stderr


def test_table_cells() -> None:
    """Tables show '-' for no value and floats to 3 decimals."""
    from dicomai.cli import cell

    cells = [cell(None), cell(""), cell(0.6572948098182678), cell(3), cell("x")]
    assert cells == ["-", "-", "0.657", "3", "x"]


def test_model_info_is_readable() -> None:
    """`model info` prints nested figures as indented lines, not Python dicts or 16 digits."""
    out = _run("model", "info")
    assert out.returncode == 0, out.stderr
    assert "{'" not in out.stdout and "[{" not in out.stdout
    assert not re.search(r"\d\.\d{5,}", out.stdout), out.stdout
    assert "\nmetrics:\n  test:\n    images" in out.stdout

"""Tests of configuration loading, layering and validation."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

import dicomai.config
from dicomai.config import Settings, find_config, load_settings, masked
from dicomai.errors import ConfigError
from tests.helpers import REPO


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file and no variables the node runs on the documented defaults, its data dir
    made absolute once, at load, from the directory the command runs in."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert (s.node.ae_title, s.node.port) == ("DICOMAI", 11112)
    assert s.node.data_dir == s.data_dir == tmp_path.resolve() / "dicomai-data"
    monkeypatch.chdir(REPO)
    assert s.data_dir == tmp_path.resolve() / "dicomai-data"
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'dicomai-data' / 'audit.sqlite3'}"
    assert s.studies.quiet_period_s == 10.0


def test_layering_cli_over_env_over_file(tmp_path: Path) -> None:
    """CLI flags beat DICOMAI_* variables, which beat the TOML file, which beats defaults."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nport = 2000\nae_title = "FILE"\nmax_associations = 3\n')
    env = {"DICOMAI_NODE__PORT": "3000", "DICOMAI_NODE__AE_TITLE": "ENV"}
    s = load_settings(cfg, {"node": {"port": 4000}}, environ=env)
    assert (s.node.port, s.node.ae_title, s.node.max_associations) == (4000, "ENV", 3)


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[node]\nprot = 1\n", {}, "node.prot"),
        ("[node]\nport = 70000\n", {}, "node.port"),
        ('[node]\nae_title = "WAY_TOO_LONG_FOR_AN_AE"\n', {}, "node.ae_title"),
        ('[[access.allowed_callers]]\nae_title = "A"\nhosts = ["not-an-ip"]\n', {},
         "access.allowed_callers.0.hosts"),
        ('[database]\nurl = "mysql://x"\n', {}, "database.url"),
        ("", {"DICOMAI_NODE__PORTT": "1"}, "DICOMAI_NODE__PORTT"),
        ("", {"DICOMAI_NOPE__PORT": "1"}, "DICOMAI_NOPE__PORT"),
        ("", {"DICOMAI_NODE__PORT__X": "1"}, "DICOMAI_NODE__PORT__X"),
        ("", {"DICOMAI_SCOPE__MODALITIES": "CR,DX"}, "DICOMAI_SCOPE__MODALITIES"),
        ("", {"DICOMAI_STUDIES__QUIET_PERIOD_S": "soon"}, "studies.quiet_period_s"),
        ("[node\n", {}, "c.toml"),
    ],
)
def test_bad_key_or_value_is_named(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    """A bad key or value raises ConfigError naming it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ=env)
    assert key in str(err.value)


def test_example_file_documents_every_key() -> None:
    """config/dicomai.toml loads, equals the defaults but for the service's absolute data dir,
    and mentions every key."""
    example = REPO / "config" / "dicomai.toml"
    loaded = load_settings(example, environ={})
    defaults = load_settings(environ={})
    assert loaded.data_dir == Path("/var/lib/dicomai")
    assert (loaded.model_copy(update={"node": loaded.node.model_copy(update={"data_dir": defaults.data_dir})})
            .model_dump(exclude={"destinations"}) == defaults.model_dump(exclude={"destinations"}))
    text = example.read_text()
    for section, model in Settings.model_fields.items():
        if section == "destinations":
            assert "[[destinations]]" in text
            continue
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"{key} =" in text, f"{section}.{key} undocumented"
    assert tomllib.loads(text)


def test_masked_hides_password() -> None:
    """config show masks the database password."""
    s = load_settings(environ={"DICOMAI_DATABASE__URL": "postgresql+psycopg://u:hunter2@db/x"})
    shown = str(masked(s))
    assert "hunter2" not in shown and "u:***@db" in shown


def test_allow_list_semantics() -> None:
    """Allow-list entries match AE title and, when pinned, the peer's network."""
    s = load_settings(environ={}, overrides={"access": {"allowed_callers": [
        {"ae_title": "PACS", "hosts": ["10.0.0.0/24"]}, {"ae_title": "MOD"}]}})
    check = s.access.check
    assert check("PACS", "10.0.0.7", "DICOMAI", "DICOMAI") is None
    assert check("PACS", "10.0.1.7", "DICOMAI", "DICOMAI") == "calling AE title not allowed from this host"
    assert check("MOD", "192.0.2.1", "DICOMAI", "DICOMAI") is None
    assert check("OTHER", "10.0.0.7", "DICOMAI", "DICOMAI") == "calling AE title not on the allow-list"
    assert check("PACS", "10.0.0.7", "SOMEONE", "DICOMAI") == "called AE title not recognised"


def test_variables_that_are_not_settings_are_left_alone() -> None:
    """Only DICOMAI_<SECTION>__<KEY> (or a whole DICOMAI_<SECTION>) is a setting: the training
    tools' and the tests' own DICOMAI_* variables do not stop a command."""
    env = {"DICOMAI_MOBILENET_V2_TFLITE": "/srv/w.tflite", "DICOMAI_TEST_DATA": "/srv/data",
           "DICOMAI_CONFIG": "/etc/x.toml", "DICOMAI_SOMETHING_ELSE": "1",
           "DICOMAI_NODE__PORT": "104",
           "DICOMAI_DESTINATIONS": '[{"name": "p", "ae_title": "PACS", "host": "h", "port": 104}]'}
    s = load_settings(environ=env)
    assert s.node.port == 104 and s.destination("p").ae_title == "PACS"


class _Watched(dict[str, str]):
    """An environment that fails the test when its DICOMAI_* variables are written or it is
    cleared (pytest itself sets PYTEST_CURRENT_TEST)."""

    def clear(self) -> None:
        raise AssertionError("load_settings cleared the process environment")

    def __setitem__(self, key: str, value: str) -> None:
        assert not key.startswith("DICOMAI_"), f"load_settings set {key}"
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        assert not key.startswith("DICOMAI_"), f"load_settings removed {key}"
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def test_loading_leaves_the_process_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings with an explicit environment neither reads nor rewrites os.environ."""
    monkeypatch.setattr(os, "environ", _Watched({"DICOMAI_NODE__PORT": "9999", "PATH": "/bin"}))
    s = load_settings(environ={"DICOMAI_NODE__AE_TITLE": "GIVEN"})
    assert (s.node.port, s.node.ae_title) == (11112, "GIVEN")
    assert load_settings().node.port == 9999  # default: os.environ, only read


def test_the_package_does_not_know_test_variables() -> None:
    """No module of dicomai names the tests' DICOMAI_TEST_* variables."""
    for path in (REPO / "dicomai").rglob("*.py"):
        assert "DICOMAI_TEST_" not in path.read_text(), path


@pytest.mark.parametrize(("text", "env", "says"), [
    ("[node]\nport = 0\n", {}, "node.port (from {cfg})"),
    ("[node]\nport = 104\n", {"DICOMAI_NODE__PORT": "x"},
     "node.port (from environment variable DICOMAI_NODE__PORT)"),
    ('[node]\nae_title = "A"\n', {"DICOMAI_NODE": '{"ae_title": "A\\\\B"}'},
     "node.ae_title (from environment variable DICOMAI_NODE)"),
    ("[nodes]\nport = 1\n", {}, "nodes (from {cfg}): unknown key"),
])
def test_error_names_where_the_bad_value_came_from(tmp_path: Path, text: str, env: dict[str, str],
                                                   says: str) -> None:
    """A bad value's message says whether it came from the file (which) or a variable (which)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ=env)
    assert says.format(cfg=cfg) in str(err.value)


def test_command_line_values_are_named_as_such() -> None:
    """A bad flag value (serve --port 70000) is reported as coming from the command line."""
    with pytest.raises(ConfigError, match=r"node.port \(from the command line\)"):
        load_settings(overrides={"node": {"port": 70000}}, environ={"DICOMAI_NODE__PORT": "1"})


def test_config_file_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, else DICOMAI_CONFIG, else /etc/dicomai/dicomai.toml when it exists, else none."""
    system = tmp_path / "etc" / "dicomai.toml"
    monkeypatch.setattr(dicomai.config.settings, "SYSTEM_CONFIG", system)
    given, named = tmp_path / "given.toml", tmp_path / "named.toml"
    assert find_config(given, {"DICOMAI_CONFIG": str(named)}) == (given, "--config")
    assert find_config(None, {"DICOMAI_CONFIG": str(named)}) == (named, "DICOMAI_CONFIG")
    assert find_config(None, {}) == (None, "no file")
    system.parent.mkdir()
    system.write_text("")
    assert find_config(None, {"DICOMAI_CONFIG": ""})[0] == system


@pytest.mark.parametrize(("make", "says"), [
    (lambda p: p, "configuration file not found"),
    (lambda p: p.mkdir() or p, "is a directory, not a configuration file"),
    (lambda p: p.write_bytes(b"\xff\xfe[node]") and p, "not UTF-8 text"),
])
def test_file_that_cannot_be_read_is_named(tmp_path: Path, make: Any, says: str) -> None:
    """A missing, directory or undecodable configuration file is a ConfigError naming it."""
    path = make(tmp_path / "c.toml")
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert str(err.value) == f"configuration error: {path}: {says}" or says in str(err.value)
    assert str(path) in str(err.value)

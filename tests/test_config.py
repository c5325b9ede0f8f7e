"""Tests of configuration loading, layering and validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dicomai.config import Settings, load_settings, masked
from dicomai.errors import ConfigError
from tests.helpers import REPO


def test_embedded_defaults() -> None:
    """With no file and no variables the node runs on the documented defaults."""
    s = load_settings(environ={})
    assert (s.node.ae_title, s.node.port, s.node.data_dir) == ("DICOMAI", 11112, Path("./dicomai-data"))
    assert s.database_url == f"sqlite:///{s.data_dir / 'audit.sqlite3'}"
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
        ("", {"DICOMAI_NOPE": "1"}, "DICOMAI_NOPE"),
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
    """config/dicomai.toml loads, equals the defaults, and mentions every key."""
    example = REPO / "config" / "dicomai.toml"
    loaded = load_settings(example, environ={})
    defaults = load_settings(environ={})
    assert loaded.model_dump(exclude={"destinations"}) == defaults.model_dump(exclude={"destinations"})
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

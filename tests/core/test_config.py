"""Typed settings from defaults, a TOML file, the environment and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from centinela.config import Settings
from centinela.errors import ConfigError


def test_defaults_are_embedded() -> None:
    s = Settings.load(env={})
    assert s.effective_database_url.startswith("sqlite:///")
    assert s.policy_bundle == "interim"
    assert s.policy_engine == "embedded"
    assert not s.insecure_dev


def test_precedence_file_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[centinela]\nlisten = "127.0.0.1:6000"\npolicy_bundle = "draft-2026"\n')
    env = {"CENTINELA_LISTEN": "127.0.0.1:7000", "CENTINELA_INSECURE_DEV": "true"}
    s = Settings.load(cfg, env=env)
    assert s.listen == "127.0.0.1:7000"
    assert s.policy_bundle == "draft-2026"
    assert s.insecure_dev is True
    assert Settings.load(cfg, env=env, listen="127.0.0.1:8000").listen == "127.0.0.1:8000"


def test_database_url_from_environment() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    assert Settings.load(env={"CENTINELA_DATABASE_URL": url}).effective_database_url == url


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CENTINELA_MAX_MESSAGE_BYTES": "lots"}, "max_message_bytes"),
        ({"CENTINELA_INSECURE_DEV": "perhaps"}, "insecure_dev"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(env=env)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[centinela]\nlisten_adress = 'x'\n")
    with pytest.raises(ConfigError, match="listen_adress"):
        Settings.load(cfg, env={})

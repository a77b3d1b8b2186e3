from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ignore_proxy.config import (
    DEFAULT_UPSTREAM,
    ConfigError,
    Settings,
    all_keys,
    env_name,
    load_settings,
)

EXAMPLE = Path(__file__).parent.parent / "config" / "ignore-proxy.toml"


def test_defaults_without_any_source() -> None:
    settings = load_settings(environ={})
    assert settings.upstream == DEFAULT_UPSTREAM
    assert settings.listen_address == ("127.0.0.1", 8010)
    assert settings.ignore.errcode == "M_SENDER_IGNORED"


def test_example_file_loads_and_equals_the_defaults() -> None:
    assert load_settings(str(EXAMPLE), environ={}) == Settings()


def test_example_file_documents_every_key_with_its_env_name() -> None:
    text = EXAMPLE.read_text()
    parsed = tomllib.loads(text)
    for key in all_keys():
        table = parsed
        for part in key[:-1]:
            table = table[part]
        assert key[-1] in table, key
        assert env_name(*key) in text, key


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'upstream = "http://file:1"\nlisten = "127.0.0.1:1"\n[ignore]\nlist_ttl = 5\n'
    )
    environ = {"IGNORE_PROXY_UPSTREAM": "http://env:2", "IGNORE_PROXY_IGNORE_LIST_TTL": "7.5"}
    settings = load_settings(str(config), {"upstream": "http://flag:3"}, environ)
    assert settings.upstream == "http://flag:3"
    assert settings.listen == "127.0.0.1:1"
    assert settings.ignore.list_ttl == 7.5


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[ignore]\nerrcode = "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"\n')
    settings = load_settings(environ={"IGNORE_PROXY_CONFIG": str(config)})
    assert settings.ignore.errcode == "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(AttributeError):
        settings.upstream = "http://elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": "many"}, "limits.max_connections"),
        ({"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": "0"}, "limits.max_connections"),
        ({"IGNORE_PROXY_IGNORE_ERRCODE": "M_FORBIDDEN"}, "ignore.errcode"),
        ({"IGNORE_PROXY_IGNORE_FILTER_EPHEMERAL": "perhaps"}, "ignore.filter_ephemeral"),
        ({"IGNORE_PROXY_UPSTREAM": "ftp://hs"}, "upstream"),
        ({"IGNORE_PROXY_UPSTREAM": "http://hs/_matrix"}, "upstream"),
        ({"IGNORE_PROXY_LISTEN": "8010"}, "listen"),
        ({"IGNORE_PROXY_LISTEN": "127.0.0.1:99999"}, "listen"),
        ({"IGNORE_PROXY_METRICS_LISTEN": "nowhere"}, "metrics.listen"),
    ],
)
def test_bad_values_name_their_key(environ: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(rf"\b{re.escape(names)}\b", message), message


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[ignore]\nerrcodes = 'M_SENDER_IGNORED'\n")
    with pytest.raises(ConfigError, match="errcodes"):
        load_settings(str(config), environ={})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings(str(tmp_path / "missing.toml"), environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("upstream = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(str(broken), environ={})

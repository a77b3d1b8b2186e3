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
        ({"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": "-1"}, "limits.max_connections"),
        ({"IGNORE_PROXY_IGNORE_ERRCODE": "M_FORBIDDEN"}, "ignore.errcode"),
        ({"IGNORE_PROXY_IGNORE_FILTER_EPHEMERAL": "perhaps"}, "ignore.filter_ephemeral"),
        ({"IGNORE_PROXY_UPSTREAM": "ftp://hs"}, "upstream"),
        ({"IGNORE_PROXY_UPSTREAM": "http://hs/_matrix"}, "upstream"),
        ({"IGNORE_PROXY_LISTEN": "8010"}, "listen"),
        ({"IGNORE_PROXY_LISTEN": "127.0.0.1:99999"}, "listen"),
        ({"IGNORE_PROXY_METRICS_LISTEN": "nowhere"}, "metrics.listen"),
        ({"IGNORE_PROXY_CLUSTER_REDIS_URL": "http://:pw@redis:6379"}, "cluster.redis_url"),
        ({"IGNORE_PROXY_CLUSTER_REDIS_URL": "redis://:pw@redis:port/0"}, "cluster.redis_url"),
        ({"IGNORE_PROXY_CLUSTER_FALLBACK_LIST_TTL": "0"}, "cluster.fallback_list_ttl"),
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


def test_a_misspelled_variable_is_refused_naming_the_real_one() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IGNORE_PROXY_IGNORE_REJECT_INVITE": "true"})
    assert str(caught.value) == (
        "unknown environment variable IGNORE_PROXY_IGNORE_REJECT_INVITE; "
        "did you mean IGNORE_PROXY_IGNORE_REJECT_INVITES?"
    )
    with pytest.raises(ConfigError, match=r"IGNORE_PROXY_NOTHING_LIKE_IT$"):
        load_settings(environ={"IGNORE_PROXY_NOTHING_LIKE_IT": "1"})
    # Variables of other programs are none of its business.
    assert load_settings(environ={"IGNORE_PROXYX": "1", "PROXY_IGNORE": "1"}) == Settings()


def test_every_documented_variable_is_accepted() -> None:
    from ignore_proxy.config import environment_names

    assert "IGNORE_PROXY_CONFIG" in environment_names()
    for key in all_keys():
        assert env_name(*key) in environment_names()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[ignore]\nerrcodes = 'M_SENDER_IGNORED'\n",
         "unknown config key ignore.errcodes; did you mean ignore.errcode?"),
        ("[ignores]\nerrcode = 'M_SENDER_IGNORED'\n",
         "unknown config key ignores; did you mean ignore?"),
        ("upstreams = 'http://hs'\n", "unknown config key upstreams; did you mean upstream?"),
        ("ignore = 5\n", "config table [ignore]: expected a table of keys"),
    ],
)  # fmt: skip
def test_file_errors_name_what_exists(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), environ={})
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("IGNORE_PROXY_LOGGING_LEVEL", "warn",
         "config key logging.level (IGNORE_PROXY_LOGGING_LEVEL): expected one of debug, info, "
         "warning, error, got 'warn'"),
        ("IGNORE_PROXY_IGNORE_ON_UNAVAILABLE", "shrug",
         "config key ignore.on_unavailable (IGNORE_PROXY_IGNORE_ON_UNAVAILABLE): expected one "
         "of refuse, pass, got 'shrug'"),
        ("IGNORE_PROXY_IGNORE_REJECT_INVITES", "perhaps",
         "config key ignore.reject_invites (IGNORE_PROXY_IGNORE_REJECT_INVITES): expected true "
         "or false (also yes/no, on/off, 1/0), got 'perhaps'"),
        ("IGNORE_PROXY_LIMITS_MAX_CONNECTIONS", "many",
         "config key limits.max_connections (IGNORE_PROXY_LIMITS_MAX_CONNECTIONS): expected "
         "`int`, got 'many'"),
        ("IGNORE_PROXY_WORKERS", "0",
         "config key workers (IGNORE_PROXY_WORKERS): expected `int` >= 1, got '0'"),
    ],
)  # fmt: skip
def test_bad_values_list_what_is_accepted(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={variable: value})
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("spelling", "meaning"),
    [("true", True), ("True", True), ("yes", True), ("ON", True), ("1", True),
     ("false", False), ("No", False), ("off", False), ("0", False)],
)  # fmt: skip
def test_booleans_in_their_usual_spellings(spelling: str, meaning: bool) -> None:
    settings = load_settings(environ={"IGNORE_PROXY_IGNORE_REJECT_INVITES": spelling})
    assert settings.ignore.reject_invites is meaning


def test_choices_in_any_letter_case() -> None:
    environ = {"IGNORE_PROXY_LOGGING_LEVEL": "INFO", "IGNORE_PROXY_LOGGING_FORMAT": "Json"}
    settings = load_settings(environ=environ)
    assert (settings.logging.level, settings.logging.format) == ("info", "json")


@pytest.mark.parametrize(
    ("listen", "metrics", "clash"),
    [
        ("127.0.0.1:8010", "127.0.0.1:8010", True),
        ("127.0.0.1:8010", "0.0.0.0:8010", True),
        ("0.0.0.0:8010", "127.0.0.1:8010", True),
        ("[::]:8010", "127.0.0.1:8010", True),
        ("localhost:8010", "127.0.0.1:8010", True),
        ("127.0.0.1:8010", "127.0.0.1:9010", False),
        ("127.0.0.1:8010", "127.0.0.2:8010", False),
    ],
)
def test_metrics_need_a_port_of_their_own(listen: str, metrics: str, clash: bool) -> None:
    environ = {"IGNORE_PROXY_LISTEN": listen, "IGNORE_PROXY_METRICS_LISTEN": metrics}
    if not clash:
        assert load_settings(environ=environ).metrics.listen == metrics
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert str(caught.value).startswith("config key metrics.listen (IGNORE_PROXY_METRICS_LISTEN): ")


@pytest.mark.parametrize("url", ["http://:secret@redis:6379", "redis://:secret@redis:port/0"])
def test_a_bad_redis_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IGNORE_PROXY_CLUSTER_REDIS_URL": url})
    assert "cluster.redis_url" in str(caught.value)
    assert "secret" not in str(caught.value)

"""The README, docs/ and the example config keep up with the code: every key documented
under its environment name, every file linked present (tests/test_readme.py: the quick
start)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from ignore_proxy.config import Settings, all_keys, env_name, load_settings

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
EXAMPLE = ROOT / "config" / "ignore-proxy.toml"


def test_every_key_is_in_the_readme_table_and_the_example() -> None:
    example = EXAMPLE.read_text()
    for key in all_keys():
        dotted, env = ".".join(key), env_name(*key)
        assert re.search(rf"^\| `{re.escape(dotted)}` \| `{env}` \|", CONFIGURATION, re.M), dotted
        assert env in example, env


def test_example_config_loads_validates_and_shows_the_defaults() -> None:
    from_file = load_settings(str(EXAMPLE), environ={})
    assert from_file == Settings()
    # Every key is written out (no section or key only implied).
    written = tomllib.loads(EXAMPLE.read_text())
    assert written == msgspec.to_builtins(Settings())


def test_relative_links_in_the_readme_and_docs_exist() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", text):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve()
            assert linked.exists(), (page.name, target)
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in anchors, (page.name, target)


def test_the_exit_status_table_is_the_program_s() -> None:
    import socket

    from ignore_proxy import startup

    section = README.split("Every failure is one line on stderr", 1)[1].split("\n\n")[1]
    statuses = {int(m) for m in re.findall(r"^\| (\d) \|", section, re.M)}
    assert statuses == {
        startup.EXIT_OK, startup.EXIT_FAILED, startup.EXIT_CONFIG, startup.EXIT_CANNOT_START
    }  # fmt: skip
    (example,) = re.findall(r"`(cannot listen on HOST:PORT \(listen\): [^`]+)`", section)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        try:
            startup.bind("listen", address).close()
        except startup.CannotStart as exc:
            assert str(exc) == example.replace("HOST:PORT", address)
        else:
            raise AssertionError("a taken port was bound")


def test_the_configuration_error_examples_are_real() -> None:
    from ignore_proxy.config import ConfigError

    examples = {
        "IGNORE_PROXY_IGNORE_ON_UNAVAILABLE": "shrug",
        "IGNORE_PROXY_IGNORE_REJECT_INVITE": "true",
    }
    for variable, value in examples.items():
        try:
            load_settings(environ={variable: value})
        except ConfigError as exc:
            assert f"`{exc}`" in " ".join(CONFIGURATION.split()), exc
        else:
            raise AssertionError(variable)


def test_the_metrics_table_lists_every_series() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ignore_proxy.app import create_app

    # With cluster.redis_url set its series are there too (nothing connects until start).
    settings = load_settings(environ={"IGNORE_PROXY_CLUSTER_REDIS_URL": "redis://127.0.0.1:1/0"})
    text = generate_latest(create_app(settings).metrics.registry).decode()
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # a counter's creation time, not a series
    }
    section = README.split("## Metrics and logs", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(ignore_proxy_[a-z_]+)", section))
    assert documented == exposed


def test_the_readme_names_the_image_s_base_and_health_listener() -> None:
    (final_base,) = re.findall(r"^FROM (\S+)$", (ROOT / "Dockerfile").read_text(), re.M)[-1:]
    assert f"(`{final_base}`," in README
    for shipped in (ROOT / "config" / "nginx").glob("*.conf"):
        (health,) = re.findall(r"listen ([\d.:]+);  # HEALTH LISTEN", shipped.read_text())
        assert f"`listen {health}`" in README, shipped.name


def test_the_well_known_check_asks_for_the_proxy_s_feature() -> None:
    from ignore_proxy.rewrite import MSC4406_FEATURE

    assert f'.unstable_features["{MSC4406_FEATURE}"]' in README


def test_the_license_file_is_the_one_pyproject_names() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pyproject["license"] == "Apache-2.0"
    assert pyproject["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text

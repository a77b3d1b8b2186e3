"""The README and the example config keep up with the code: every key documented under
its environment name, every file linked present (tests/test_readme.py: the quick start)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from ignore_proxy.config import Settings, all_keys, env_name, load_settings

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "config" / "ignore-proxy.toml"


def test_every_key_is_in_the_readme_table_and_the_example() -> None:
    example = EXAMPLE.read_text()
    for key in all_keys():
        dotted, env = ".".join(key), env_name(*key)
        assert re.search(rf"^\| `{re.escape(dotted)}` \| `{env}` \|", README, re.M), dotted
        assert env in example, env


def test_example_config_loads_validates_and_shows_the_defaults() -> None:
    from_file = load_settings(str(EXAMPLE), environ={})
    assert from_file == Settings()
    # Every key is written out (no section or key only implied).
    written = tomllib.loads(EXAMPLE.read_text())
    assert written == msgspec.to_builtins(Settings())


def test_relative_links_in_the_readme_exist() -> None:
    for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", README):
        assert (ROOT / target.split("#")[0]).exists(), target

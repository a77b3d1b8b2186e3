"""The compose examples in config/compose/: each routes the proxy to its homeserver's
port, publishes nothing but nginx, keeps the metrics port off every published port, and
gives nginx the shipped config with only its marked addresses changed (`nginx -t` on it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ignore_proxy.config import load_settings, parse_host_port

from .e2e.harness.nginx import main_conf, nginx_test

ROOT = Path(__file__).parent.parent
COMPOSE_DIR = ROOT / "config" / "compose"
# The homeserver's client-server port in each example (the homeservers' own defaults).
HOMESERVER_PORTS = {"conduit": 6167, "continuwuity": 6167, "dendrite": 8008, "synapse": 8008}
PORT_VARIABLES = {"conduit": "CONDUIT_PORT", "continuwuity": "CONTINUWUITY_PORT"}
REPLICAS = "synapse-replicas"  # two instances sharing list changes through Redis


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE_DIR / f"{name}.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_one_example_per_homeserver() -> None:
    examples = sorted(p.stem for p in COMPOSE_DIR.glob("*.yml") if p.stem != REPLICAS)
    assert examples == sorted(HOMESERVER_PORTS)


@pytest.mark.parametrize("name", sorted(HOMESERVER_PORTS))
def test_proxy_points_at_the_homeserver_port(name: str) -> None:
    services = load(name)["services"]
    assert set(services) == {"homeserver", "ignore-proxy", "nginx"}
    proxy = services["ignore-proxy"]
    assert proxy["image"] == "ignore-proxy"
    assert (COMPOSE_DIR / proxy["build"] / "Dockerfile").is_file()
    env = {key: str(value) for key, value in proxy["environment"].items()}
    assert env["IGNORE_PROXY_UPSTREAM"] == f"http://homeserver:{HOMESERVER_PORTS[name]}"
    if name in PORT_VARIABLES:
        homeserver_env = services["homeserver"]["environment"]
        assert int(homeserver_env[PORT_VARIABLES[name]]) == HOMESERVER_PORTS[name]
    # The environment is a valid configuration (the image adds its listen address).
    settings = load_settings(environ={"IGNORE_PROXY_LISTEN": "0.0.0.0:8010", **env})
    assert settings.metrics.listen, "the example shows the metrics listener"


@pytest.mark.parametrize("name", sorted(HOMESERVER_PORTS))
def test_only_nginx_is_published_and_never_the_metrics_port(name: str) -> None:
    services = load(name)["services"]
    env = services["ignore-proxy"]["environment"]
    _, metrics_port = parse_host_port(env["IGNORE_PROXY_METRICS_LISTEN"])
    published: list[str] = []
    for service_name, service in services.items():
        ports = [str(port) for port in service.get("ports", [])]
        if service_name != "nginx":
            assert not ports, f"{service_name} publishes {ports}"
        published += ports
    # nginx publishes the port its shipped config listens on, and only that.
    nginx = services["nginx"]
    (shipped,) = (COMPOSE_DIR / volume.split(":")[0] for volume in nginx["volumes"])
    listens = set(re.findall(r"^\s*listen (\d+);", shipped.read_text(), re.M))
    assert len(listens) == 1, listens
    assert published, "nginx publishes no port"
    assert {port.rsplit(":", 1)[-1].split("/")[0] for port in published} == listens, published
    for port in published:
        numbers = {int(n) for n in re.findall(r"\d+", port.rsplit(":", 2)[-1])}
        assert metrics_port not in numbers and 8010 not in numbers, port


@pytest.mark.parametrize("name", sorted(HOMESERVER_PORTS))
def test_nginx_gets_the_shipped_config_with_the_service_addresses(
    name: str, tmp_path: Path
) -> None:
    nginx = load(name)["services"]["nginx"]
    mounts = {
        volume.split(":")[1]: (COMPOSE_DIR / volume.split(":")[0]).resolve()
        for volume in nginx["volumes"]
    }
    (shipped,) = mounts.values()
    assert shipped.is_file() and shipped.parent == ROOT / "config" / "nginx"
    # Run the container's own command, with its paths moved into tmp_path.
    assert nginx["entrypoint"] == ["/bin/sh", "-c"]
    (command,) = nginx["command"]
    rendered = tmp_path / "default.conf"
    setup, _, start = command.partition("&&")
    assert start.strip() == "exec nginx -g 'daemon off;'"
    setup = setup.replace(next(iter(mounts)), str(shipped)).replace(
        "/etc/nginx/conf.d/default.conf", str(rendered)
    )
    subprocess.run(["sh", "-c", setup], check=True, timeout=30)
    text, original = rendered.read_text(), shipped.read_text()
    port = HOMESERVER_PORTS[name]
    assert re.search(r"upstream ignore_proxy_\w+ \{\n    server ignore-proxy:8010;", text)
    assert re.search(rf"upstream matrix_homeserver_\w+ \{{\n    server homeserver:{port};", text)
    changed = [
        (a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 2, "only the two marked addresses change"
    # The rendered file is valid nginx (names resolved to loopback: no Docker DNS here).
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed")
    site = tmp_path / "site.conf"
    site.write_text(
        text.replace("ignore-proxy:8010", "127.0.0.1:8010").replace(
            f"homeserver:{port}", f"127.0.0.1:{port}"
        )
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_conf(tmp_path, site))
    checked = nginx_test(conf, tmp_path)
    assert checked.returncode == 0, checked.stderr


def commands(name: str) -> list[str]:
    """The shell commands at the top of an example (`#   ...` lines), run from the root."""
    text = (COMPOSE_DIR / f"{name}.yml").read_text()
    return [m.group(1) for m in re.finditer(r"^#   (\S.*)$", text, re.M)]


@pytest.mark.parametrize("name", [*sorted(HOMESERVER_PORTS), REPLICAS])
def test_the_commands_work_from_the_repository_root(name: str) -> None:
    """Run where the README says to stand, every host path of the commands is where the
    example's homeserver looks (compose resolves `./x` against the file's directory, a
    shell against its own)."""
    steps = commands(name)
    assert steps[-1] == f"docker compose -f config/compose/{name}.yml up -d --build"
    assert (ROOT / "config" / "compose" / f"{name}.yml").is_file()
    volumes = load(name)["services"]["homeserver"].get("volumes", [])
    bind_mounts = {
        (COMPOSE_DIR / volume.split(":")[0]).resolve()
        for volume in volumes
        if volume.startswith(".")
    }
    host_paths = [
        (ROOT / path).resolve()
        for step in steps
        for path in re.findall(r'-v "\$PWD/([^:"]+):', step) + re.findall(r"> (\S+)$", step)
    ]
    made = [(ROOT / m).resolve() for step in steps for m in re.findall(r"^mkdir -p (\S+)$", step)]
    for path in host_paths:
        assert path in bind_mounts or path.parent in bind_mounts, path
        assert path in made or path.parent in made, f"{path}: not created first"
    # Every bind mount of a file the homeserver needs is generated by the commands.
    for mount in bind_mounts:
        assert mount in host_paths, f"{name}: nothing creates {mount}"


def test_the_readme_gives_the_same_commands() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    for name in [*sorted(HOMESERVER_PORTS), REPLICAS]:
        for step in commands(name):
            assert " ".join(step.split()) in readme, step


def test_replicas_share_one_redis_and_only_nginx_is_published(tmp_path: Path) -> None:
    services = load(REPLICAS)["services"]
    assert set(services) == {"homeserver", "redis", "ignore-proxy-a", "ignore-proxy-b", "nginx"}
    for name in ("ignore-proxy-a", "ignore-proxy-b"):
        env = {key: str(value) for key, value in services[name]["environment"].items()}
        settings = load_settings(environ={"IGNORE_PROXY_LISTEN": "0.0.0.0:8010", **env})
        assert settings.upstream == "http://homeserver:8008"
        assert settings.cluster.redis_url == "redis://redis:6379/0"
    assert "--save" in services["redis"]["command"]  # pub/sub only: nothing to keep
    for name, service in services.items():
        assert not service.get("ports") or name == "nginx", name
    assert services["nginx"]["ports"] == ["8080:8080"]
    # nginx balances over both instances: the shipped config, rendered by its command.
    nginx = services["nginx"]
    (volume,) = nginx["volumes"]
    shipped, mounted = (COMPOSE_DIR / volume.split(":")[0]).resolve(), volume.split(":")[1]
    (command,) = nginx["command"]
    setup, _, _ = command.partition("&&")
    rendered = tmp_path / "default.conf"
    setup = setup.replace(mounted, str(shipped)).replace(
        "/etc/nginx/conf.d/default.conf", str(rendered)
    )
    subprocess.run(["sh", "-c", setup], check=True, timeout=30)
    text = rendered.read_text()
    assert "server ignore-proxy-a:8010; server ignore-proxy-b:8010;" in text
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed")
    site = tmp_path / "site.conf"
    site.write_text(
        text.replace("ignore-proxy-a:8010", "127.0.0.1:8010")
        .replace("ignore-proxy-b:8010", "127.0.0.1:8011")
        .replace("homeserver:8008", "127.0.0.1:8008")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_conf(tmp_path, site))
    checked = nginx_test(conf, tmp_path)
    assert checked.returncode == 0, checked.stderr

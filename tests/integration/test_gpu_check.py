"""`make gpu-check` and `make wheelhouse` where there is no GPU: the `gpu` tests skip saying why,
the check refuses to report a pass, and the wheel folder installs offline and imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def _pins(path: Path) -> dict[str, str]:
    """{normalised distribution name: version} of a pip requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_gpu_requirements_are_pinned_as_the_lock():
    gpu, lock = _pins(REPO / "requirements-gpu.txt"), _pins(REPO / "requirements.lock")
    assert {name: lock.get(name) for name in gpu} == gpu
    # the GPU machine's own PyTorch stack is never installed over
    assert not {"torch", "torchvision", "numpy", "timm", "accelerate"} & set(gpu)


@NO_CUDA
def test_gpu_tests_skip_without_cuda_and_say_why():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/integration/test_gpu.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"\d+ skipped", proc.stdout) and "passed" not in proc.stdout
    assert "needs a CUDA device: torch" in proc.stdout and "sees none" in proc.stdout


@NO_CUDA
def test_gpu_check_without_cuda_writes_its_report_and_fails(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--report", str(tmp_path), "--part", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    (report,) = tmp_path.glob("gpu-check-*/report.md")
    text = report.read_text()
    assert "torch sees no CUDA device" in text and "- torch: " in text


@pytest.mark.slow
def test_wheelhouse_installs_offline_into_a_private_folder_and_imports(tmp_path):
    """As on a GPU node: `make wheelhouse` for this Python, then gpu-check's own install
    (pip --no-index --no-deps --target) of every pinned package, and the project imports them
    from that folder."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    make = subprocess.run(
        ["make", "wheelhouse", f"WHEELS={wheels}"], cwd=REPO, capture_output=True, text=True
    )
    assert make.returncode == 0, make.stderr[-3000:]
    assert len(list(wheels.glob("*.whl"))) == len(_pins(REPO / "requirements-gpu.txt"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    pip += ["--target", str(site), "--find-links", str(wheels)]
    pip += ["-r", str(REPO / "requirements-gpu.txt")]
    installed = subprocess.run(pip, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import pydantic, yaml, safetensors, imagesize, psutil, pytest, nvidia.dali.fn\n"
        "for m in (pydantic, yaml, safetensors, imagesize, psutil, pytest, nvidia.dali):\n"
        "    assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "from pipeline.recipe import load_recipe\n"
        "print(load_recipe('recipes/imagenet/alignmixup.yaml').method.draws)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "per_rank"

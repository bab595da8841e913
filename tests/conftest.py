"""Shared fixtures: the digits JPEG dataset, a tiny-recipe factory, one MLflow store per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Tiny settings every end-to-end test starts from: a 0.37M-parameter timm ResNet at 32 px.
TINY_OVERRIDES = [
    "model.name=test_resnet",
    "model.timm_kwargs={}",  # not the demo recipe's half-width channels
    "model.output_stride=8",
    "model.channels_last=false",
    "data.backend=torchvision",
    "data.batch_size=16",
    "data.num_threads=1",
    "data.train_size=32",
    "data.val_resize=32",
    "data.val_crop=32",
    "data.color_jitter=0",
    "data.lighting=0",
    "data.flip=false",
    "data.max_val_samples=64",
    "optim.reference_batch=16",
    "optim.milestones=[100]",
    "train.amp=no",
    "train.cpu=true",
    "train.progress=false",
    "train.log_every=1",
    "tracking.system_metrics=false",
]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are skipped, and the reason says so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} sees none "
        "(run them with `make gpu-check` on a GPU machine; docs/gpu.md)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's digits as train/val folders of real 32×32 JPEGs."""
    from pipeline.data.demo import build_digits_dataset

    return build_digits_dataset(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session (creating its tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates the tables once
    return uri


@pytest.fixture
def tiny_overrides(digits_root, mlflow_uri, tmp_path):
    """Overrides for a few-step CPU run on the digits, writing under this test's tmp_path."""

    def make(*extra: str, output: str = "run") -> list[str]:
        return [
            *TINY_OVERRIDES,
            f"data.root={digits_root}",
            f"train.output_dir={tmp_path / output}",
            f"tracking.tracking_uri={mlflow_uri}",
            *extra,
        ]

    return make


@pytest.fixture
def one_torch_thread():
    """Small tensors: one thread avoids OpenMP spin-waits when the CPU is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes: the repo importable, two threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def recorded(monkeypatch):
    """The (λ, π) every method draws, recorded from the real `sample_mix` (patched in each
    method module that imports it), so a test can rebuild the expected mix by hand."""
    import importlib
    import pkgutil

    import pipeline.methods
    from pipeline.mixing import sample_mix

    draws = []

    def recording(*args, **kwargs):
        draws.append(sample_mix(*args, **kwargs))
        return draws[-1]

    for info in pkgutil.iter_modules(pipeline.methods.__path__):
        module = importlib.import_module(f"pipeline.methods.{info.name}")
        if hasattr(module, "sample_mix"):
            monkeypatch.setattr(module, "sample_mix", recording)
    return draws

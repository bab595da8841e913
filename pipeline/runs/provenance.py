"""Where a run comes from, as tags on every MLflow run the pipeline creates: the code (git commit,
branch, dirty tree and its diff), the software (pipeline, torch, CUDA, cuDNN, timm, DALI,
Accelerate, MLflow), the machine (hosts, GPUs, world size) and the job (command line, Slurm ids).

`mlflow.start_run` sets MLflow's source tags (the UI's Source and User); `MlflowClient.create_run`,
which the pipeline uses, does not, so they are set here. Git is asked about the checkout that
holds the `pipeline` package; without git, or outside a checkout, the git tags say "unknown".
Only `source_tags`, `run_tags`, `new_run` and `refresh` import MLflow: a training run keeps
`source()` in its journal (with `tracking.enabled: false` too, which imports no MLflow) and the
sender gives it MLflow's tag names (sender.py).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]  # the checkout holding the `pipeline` package
_MAIN = Path(__file__).resolve().parents[1] / "__main__.py"  # `python -m pipeline` runs it
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"
TAG_LIMIT = 5000  # the tag value limit of older MLflow servers (newer ones take 8000)
DIFF_FOLDER, DIFF_FILE = "code", "git_diff.patch"  # the diff's artifact: code/git_diff.patch
DIRTY_TAG = "pipeline.git.dirty"
_GIT_TIMEOUT = 5.0  # s per git call: a hung file system delays no run for long
_SLURM = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    "SLURM_JOB_NODELIST": "slurm.job_nodelist",
}


def _git(*args: str) -> str | None:
    """The output of `git args` in the pipeline's checkout, None when git cannot answer."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_diff() -> str | None:
    """`git diff HEAD` of the checkout: "" when the tracked files are as committed, None when it
    is not known (no git, not a checkout). Untracked files are not part of it."""
    return _git("diff", "--no-color", "--no-ext-diff", "HEAD")


def _invocation() -> list[str]:
    """`sys.argv`, with the package's `__main__.py` written as `python -m pipeline`."""
    argv = list(sys.argv) or [""]
    if argv[0] and Path(argv[0]).resolve() == _MAIN:
        return ["python", "-m", "pipeline", *argv[1:]]
    return argv


def _source_name() -> str:
    """`python -m pipeline <command>` for the pipeline's commands, else the entry script."""
    argv = _invocation()
    if argv[:3] == ["python", "-m", "pipeline"]:
        return " ".join(argv[:4])
    return argv[0] or "<console>"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return UNKNOWN


def source() -> dict[str, str]:
    """The facts behind MLflow's source tags (`source_tags` names them), here without MLflow."""
    commit = _git("rev-parse", "HEAD")
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    return {
        "name": _source_name(),
        "git_commit": commit.strip() if commit else UNKNOWN,
        "git_branch": branch.strip() if branch else UNKNOWN,
        "user": _user(),
    }


def source_tags(facts: dict[str, str]) -> dict[str, str]:
    """`source()`'s facts under MLflow's own tag names, the source type LOCAL."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    names = {
        "name": MLFLOW_SOURCE_NAME,
        "git_commit": MLFLOW_GIT_COMMIT,
        "git_branch": MLFLOW_GIT_BRANCH,
        "user": MLFLOW_USER,
    }
    tags = {names[key]: value for key, value in facts.items() if key in names}
    tags[MLFLOW_SOURCE_TYPE] = SourceType.to_string(SourceType.LOCAL)
    return tags


def _version(*distributions: str) -> str:
    """The installed version of the first of `distributions` found, else "not installed"."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return NOT_INSTALLED


def _dali_version() -> str:
    """DALI's version; its wheel is named after the CUDA it is built for (nvidia-dali-cuda120)."""
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if re.fullmatch(r"nvidia-dali(-cuda\d+)?", name):
            return dist.version
    return NOT_INSTALLED


def _pipeline_version() -> str:
    """The checkout's pyproject.toml version (what runs), else the installed one."""
    try:
        found = re.search(
            r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE
        )
    except OSError:
        found = None
    if found:
        return found.group(1)
    installed = _version("alignmixup-pipeline")
    return UNKNOWN if installed == NOT_INSTALLED else installed


def _torch_tags() -> dict[str, str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "pipeline.version.torch": torch.__version__,
        "pipeline.version.cuda": torch.version.cuda or "none",
        "pipeline.version.cudnn": str(cudnn) if cudnn else "none",
        "pipeline.gpu.count": str(count),
        "pipeline.gpu.names": ", ".join(torch.cuda.get_device_name(i) for i in range(count))
        or "none",
    }


def pipeline_tags(
    diff: str | None, world_size: int = 1, hosts: list[str] | None = None
) -> dict[str, str]:
    """The pipeline's own provenance tags; `diff` is `git_diff()`'s answer (the dirty flag)."""
    tags = {
        DIRTY_TAG: UNKNOWN if diff is None else str(bool(diff)).lower(),
        "pipeline.version": _pipeline_version(),
        **_torch_tags(),
        "pipeline.version.timm": _version("timm"),
        "pipeline.version.dali": _dali_version(),
        "pipeline.version.accelerate": _version("accelerate"),
        "pipeline.version.mlflow": _version("mlflow", "mlflow-skinny"),
        "pipeline.hosts": ", ".join(hosts or [socket.gethostname()]),
        "pipeline.world_size": str(world_size),
        "pipeline.command": shlex.join(_invocation()),
    }
    tags.update({tag: os.environ[var] for var, tag in _SLURM.items() if os.environ.get(var)})
    return {key: _fit(value) for key, value in tags.items()}


def _fit(value: str) -> str:
    """`value` cut to MLflow's tag limit, the cut marked."""
    return value if len(value) <= TAG_LIMIT else value[: TAG_LIMIT - 3] + "..."


def run_tags(
    diff: str | None, world_size: int = 1, hosts: list[str] | None = None
) -> dict[str, str]:
    """Every provenance tag of a run created by this process, MLflow's source tags included."""
    return {**source_tags(source()), **pipeline_tags(diff, world_size, hosts)}


def log_diff(client: MlflowClient, run_id: str, diff: str | None) -> None:
    """The uncommitted changes as the run's artifact `code/git_diff.patch`, when there are any."""
    if diff:
        client.log_text(run_id, diff, f"{DIFF_FOLDER}/{DIFF_FILE}")


def new_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A run created with `tags` and its provenance (the diff logged when dirty); its id."""
    diff = git_diff()
    created = client.create_run(experiment_id, run_name=run_name, tags={**run_tags(diff), **tags})
    log_diff(client, created.info.run_id, diff)
    return created.info.run_id


def refresh(client: MlflowClient, run_id: str, dirty_before: bool) -> None:
    """A reused run's provenance made this process's: its tags overwritten and its diff logged,
    or emptied when the tree, dirty when the run was last logged (`dirty_before`), is clean."""
    from mlflow.entities import RunTag

    diff = git_diff()
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags(diff).items()])
    if dirty_before and not diff:
        client.log_text(run_id, "", f"{DIFF_FOLDER}/{DIFF_FILE}")
    log_diff(client, run_id, diff)

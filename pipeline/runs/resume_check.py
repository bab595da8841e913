"""What a resume may change: a run continued from a checkpoint must be the run that was started,
so a recipe that differs from the checkpoint's `recipe.yaml` is refused, except in the keys
below, which change how a run is watched, stored or fed, not what it computes (docs/slurm.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, flatten_keys, load_recipe

__all__ = ["SAFE_KEYS", "SAFE_PREFIXES", "check_resumable"]

# Keys a resume may change: length of the run, logging, checkpoints, where things live, how
# fast the data is read, and tracking (except the experiment, which would split the run).
SAFE_KEYS = frozenset(
    {
        "name",
        "train.epochs",
        "train.max_steps",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.checkpoint_minutes",
        "train.keep_checkpoints",
        "train.preempt_check_every",
        "train.collective_timeout_minutes",
        "train.progress",
        "train.log_seconds",
        "train.resume",
        "train.output_dir",
        "data.root",
        "data.train_list",
        "data.val_list",
        "data.index_dir",
        "data.num_threads",
        "data.plan_workers",
        "data.hw_decoder_load",
        "data.val_batch_size",
        # used only when the model is first built, or for speed: the weights come from the
        # checkpoint either way
        "model.pretrained",
        "model.zero_init_last",
        "model.channels_last",
        "model.compile",
        # the same plans either way, to float32 rounding (docs/mixing.md)
        "method.sinkhorn_backend",
    }
)
SAFE_PREFIXES = ("tracking.",)
_UNSAFE_TRACKING = frozenset({"tracking.experiment"})


def _safe(key: str) -> bool:
    return key in SAFE_KEYS or (key.startswith(SAFE_PREFIXES) and key not in _UNSAFE_TRACKING)


def check_resumable(recipe: Recipe, saved: Path) -> None:
    """Raise RecipeError listing every key in which `recipe` differs from the recipe a checkpoint
    was saved with (`saved`, its recipe.yaml), other than the safe ones. A key this version
    added is accepted at its default value (the behaviour of the version that started the run)."""
    before = flatten_keys(yaml.safe_load(saved.read_text()) or {})
    now = recipe.flat()
    try:  # what this version gives the saved run's method by default
        defaults = load_recipe(None, [f"method.name={before.get('method.name')}"]).flat()
    except RecipeError:  # that method is no longer registered: no key is new at its default
        defaults = {}
    changed = []
    for key in sorted(set(before) | set(now)):
        if _safe(key):
            continue
        if key not in before:
            if now[key] != defaults.get(key, object()):
                changed.append(f"{key} (new key, set to {now[key]!r})")
        elif key not in now:
            changed.append(f"{key} (was {before[key]!r}, no longer a key)")
        elif before[key] != now[key]:
            changed.append(f"{key}: {before[key]!r} → {now[key]!r}")
    if changed:
        raise RecipeError(
            f"train.resume: the recipe differs from the one this run was started with ({saved}) "
            f"in {len(changed)} key(s):\n  " + "\n  ".join(changed) + "\nChange them back, or "
            "start a new run (another train.output_dir, or train.resume=never). Keys a resume "
            "may change: " + ", ".join(sorted(SAFE_KEYS)) + ", tracking.* but tracking.experiment"
        )

"""Files a run writes follow the process's umask, as every other program's do: with 022 a lab's
models are readable by the lab (safetensors alone writes 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.recipe import load_recipe
from pipeline.training import Trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_models_checkpoints_and_journal_follow_the_umask(tiny_overrides, umask):
    previous = os.umask(umask)
    try:
        overrides = tiny_overrides("train.max_steps=2", "tracking.enabled=false")
        trainer = Trainer(load_recipe(None, overrides))
        trainer.fit()
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # what open(…, O_CREAT, 0o666) gives under this umask
    files = [p for p in trainer.output_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model_final.safetensors", "model.safetensors", "journal.jsonl"} <= names
    modes = {str(p.relative_to(trainer.output_dir)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {k: oct(v) for k, v in modes.items() if v != expected} == {}, oct(expected)

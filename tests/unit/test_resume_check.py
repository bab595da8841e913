"""Which recipe changes a resume accepts: hand-written saved recipes against the current one."""

from __future__ import annotations

import pytest
import yaml

from pipeline.errors import RecipeError
from pipeline.recipe import dump_recipe, load_recipe
from pipeline.runs.resume_check import check_resumable


def _saved(tmp_path, tree: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_same_recipe_and_safe_changes_resume(tmp_path):
    recipe = load_recipe(None, ["method.name=alignmixup"])
    saved = _saved(tmp_path, yaml.safe_load(dump_recipe(recipe)))
    check_resumable(recipe, saved)
    longer = ["method.name=alignmixup", "train.epochs=400", "data.root=/elsewhere"]
    check_resumable(load_recipe(None, [*longer, "tracking.tracking_uri=http://h:5000"]), saved)


def test_a_key_added_since_the_run_started_is_accepted_at_its_default_only(tmp_path):
    recipe = load_recipe(None, ["method.name=alignmixup"])
    tree = yaml.safe_load(dump_recipe(recipe))
    del tree["method"]["draws"]  # a checkpoint from before `method.draws` existed
    saved = _saved(tmp_path, tree)
    check_resumable(recipe, saved)  # `global`, the default: what that version did
    with pytest.raises(RecipeError, match=r"method\.draws \(new key, set to 'per_rank'\)"):
        check_resumable(
            load_recipe(None, ["method.name=alignmixup", "method.draws=per_rank"]), saved
        )


def test_changed_and_removed_keys_are_all_named(tmp_path):
    recipe = load_recipe(None, ["method.name=manifold_mixup"])
    tree = yaml.safe_load(dump_recipe(recipe))
    tree["method"]["levels"] = [0, 1, 2, 3]  # the old default
    tree["optim"]["lr"] = 0.2
    tree["method"]["manifold_levels"] = [1]  # a key this version no longer has
    tree["tracking"]["experiment"] = "other"
    with pytest.raises(RecipeError) as err:
        check_resumable(recipe, _saved(tmp_path, tree))
    text = str(err.value)
    assert "in 4 key(s)" in text
    assert "method.levels: [0, 1, 2, 3] → [0, 1, 2]" in text and "optim.lr: 0.2 → 0.1" in text
    assert "method.manifold_levels (was [1], no longer a key)" in text
    assert "tracking.experiment: 'other' → 'alignmixup'" in text

"""Recipes: unknown keys and wrong types name the key and the file; overrides are typed."""

from __future__ import annotations

import pytest

from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, dump_recipe, load_recipe


def test_overrides_are_parsed_as_yaml(tmp_path):
    overrides = ["data.batch_size=32", "method.name=manifold_mixup", "method.levels=[0,2]"]
    r = load_recipe(None, [*overrides, "train.amp=no"])
    assert r.data.batch_size == 32 and r.method.levels == [0, 2]
    assert r.train.amp == "no"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  bach_size: 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*\n.*unknown key 'data\.bach_size'"):
        load_recipe(path)


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(RecipeError, match=r"'train\.epochs'.*'many'"):
        load_recipe(path)


def test_unknown_method_is_rejected():
    with pytest.raises(RecipeError, match=r"'method\.name': unknown method 'stylemix'"):
        load_recipe(None, ["method.name=stylemix"])


def test_override_without_equals_sign():
    with pytest.raises(RecipeError, match=r"expected key=value"):
        load_recipe(None, ["train.epochs"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ndata:\n  batch_size: 8\n  num_threads: 3\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\ndata:\n  batch_size: 4\n"
    )
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.name, r.data.batch_size, r.data.num_threads) == ("child", 4, 3)


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_dumped_recipe_round_trips(tmp_path):
    r = load_recipe(None, ["method.name=alignmixup_ae", "optim.grad_clip=1.5"])
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r
    assert Recipe().flat()["method.name"] == "baseline"


def test_params_hold_only_the_chosen_methods_settings():
    assert {k for k in Recipe().flat() if k.startswith("method.")} == {"method.name"}
    ae = load_recipe(None, ["method.name=alignmixup_ae"]).flat()
    assert ae["method.clean_prob"] == 0.2 and "method.levels" not in ae

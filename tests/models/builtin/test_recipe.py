from dataclasses import replace

import pytest

from fedexperts.errors import FedExpertsError
from fedexperts.models import builtin
from fedexperts.models.builtin import RECIPES, default_model_path, model_path

MICRO = RECIPES["micro"]


def test_checkpoint_lands_in_the_cache_under_the_recipe_hash(cache, built):
    assert built == cache / "models" / f"expertbench-olmoe-micro-{MICRO.digest()}"
    names = {path.name for path in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    assert {builtin.RECIPE_FILE, builtin.METRICS_FILE, builtin.ROUTING_PLOT} <= names
    assert not [path for path in built.parent.iterdir() if path.name.startswith(".")], "staging folders left behind"
    assert (built / builtin.ROUTING_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_default_model_path_reuses_the_cache(built, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although the cache holds the recipe")

    monkeypatch.setattr(builtin, "pretrain", no_training)
    assert default_model_path("micro") == built


def test_missing_model_without_building_is_a_clear_error(cache):
    other = replace(MICRO, seed=99)
    with pytest.raises(FedExpertsError, match="not built yet; run `fedexperts pretrain`"):
        default_model_path(other, build=False)
    with pytest.raises(FedExpertsError, match="unknown recipe 'huge'"):
        default_model_path("huge")


def test_recipe_hash_follows_every_field():
    assert MICRO.digest() == replace(MICRO).digest()
    assert MICRO.digest() != replace(MICRO, steps=MICRO.steps + 1).digest()
    assert MICRO.digest() != replace(MICRO, world_seed=1).digest()
    assert model_path(MICRO) != model_path(RECIPES["default"])

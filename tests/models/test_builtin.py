import json
from dataclasses import replace

import pytest
import torch
import transformers
from typer.testing import CliRunner

from fedexperts.cli import app
from fedexperts.data.expertbench import ExpertBench
from fedexperts.errors import FedExpertsError
from fedexperts.models import builtin
from fedexperts.models.builtin import RECIPES, build_tokenizer, default_model_path, model_path, pretrain
from fedexperts.models.load import load_model
from fedexperts.moe import moe_layers

MICRO = RECIPES["micro"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDEXPERTS_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def built(cache):
    return default_model_path("micro", progress=False)


def test_checkpoint_lands_in_the_cache_under_the_recipe_hash(cache, built):
    assert built == cache / "models" / f"expertbench-olmoe-micro-{MICRO.digest()}"
    names = {path.name for path in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    assert {builtin.RECIPE_FILE, builtin.METRICS_FILE, builtin.ROUTING_PLOT} <= names
    assert not [path for path in built.parent.iterdir() if path.name.startswith(".")], "staging folders left behind"
    assert (built / builtin.ROUTING_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_loads_with_plain_transformers_and_is_a_supported_moe(built):
    model = transformers.AutoModelForCausalLM.from_pretrained(built)
    tokenizer = transformers.AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "olmoe"
    assert model.config.num_experts == 8
    assert len(moe_layers(model)) == MICRO.num_layers
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.chat_template
    text = "Question: What does Varo export?\nAnswer: salt"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    loaded = load_model(built)
    assert loaded.family.model_type == "olmoe"


def test_model_card_holds_the_measured_numbers(built):
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    card = (built / "README.md").read_text()
    assert f"accuracy {metrics['probe_accuracy']:.1%}" in card
    assert f"chance {metrics['probe_chance']:.0%}" in card
    assert metrics["probe_count"] == len(ExpertBench.from_seed(0).world.facts)
    for category, value in metrics["routing_entropy_bits"].items():
        assert f"| {category} | {value:.3f} |" in card
        assert 0.0 <= value <= 3.0
    assert f"{metrics['routing_between_categories_tv']:.3f} between categories" in card
    assert MICRO.digest() in card
    assert metrics["train"]["steps"] == MICRO.steps
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"]


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


def test_pretraining_is_deterministic(built, tmp_path):
    again = pretrain(MICRO, tmp_path / "again", progress=False)
    first = transformers.AutoModelForCausalLM.from_pretrained(built).state_dict()
    second = transformers.AutoModelForCausalLM.from_pretrained(again.path).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    assert again.metrics["probe_accuracy"] == metrics["probe_accuracy"]


def test_tokenizer_is_deterministic():
    bench = ExpertBench.from_seed(0)
    assert build_tokenizer(bench, MICRO).get_vocab() == build_tokenizer(bench, MICRO).get_vocab()


def test_pretrain_command_reports_and_then_reuses(built):
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", "--recipe", "micro"])
    assert result.exit_code == 0, result.output
    assert "already built" in result.output
    assert str(built) in result.output.replace("\n", "")
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    assert f"probe accuracy {metrics['probe_accuracy']:.1%}" in " ".join(result.output.split())
    result = runner.invoke(app, ["pretrain", "--recipe", "nope"])
    assert result.exit_code == 2
    assert "unknown recipe 'nope'" in result.output

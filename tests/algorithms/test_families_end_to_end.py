"""FLEx and FedMoE end to end (in-process runtime, two rounds) on tiny families beyond the micro OLMoE.

GLM-4.5's block (sigmoid, group-limited routing with a correction bias, a shared expert, a dense first
layer) and Llama 4's (a router that is an ``nn.Linear`` returning dense scores, experts outside
transformers' standard interface, interleaved dense layers) are the two most unlike the micro model.
Each tiny model is saved with the micro model's tokenizer so the runs read the same data.
"""

import pytest
import transformers
from safetensors import safe_open

from fedexperts.federation.inprocess import run_experiment
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers


@pytest.fixture(scope="module")
def tiny_folder(micro_model_path, tmp_path_factory):
    """``model_type`` -> a saved tiny model of it with the micro model's tokenizer."""

    def make(model_type):
        folder = tmp_path_factory.mktemp(model_type)
        tokenizer = transformers.AutoTokenizer.from_pretrained(micro_model_path)
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        tiny_model(model_type, vocab_size=len(tokenizer), **ids).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make


CHEAP = ("federation.clients=2", "eval.every=0", "eval.union_examples=0", "eval.probes=0", "eval.max_examples=2")


def ok_rounds(result):
    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    return [record["clients"] for record in result.records[1:3]]


@pytest.mark.parametrize("model_type", ["glm4_moe"])
def test_flex_runs_end_to_end(model_type, tiny_folder, micro_config):
    folder = tiny_folder(model_type)
    result = run_experiment(micro_config("algorithm.name=flex", f'model.name="{folder}"', *CHEAP))
    for clients in ok_rounds(result):
        assert all(entry["status"] == "ok" for entry in clients.values())
    layers = {layer.name for layer in moe_layers(transformers.AutoModelForCausalLM.from_pretrained(folder))}
    states = sorted((result.run_dir / "clients").glob("*.safetensors"))
    assert [path.stem for path in states] == ["client-0", "client-1"]
    for path in states:  # each client's grafted experts, one per MoE layer (the dense first layer has none)
        with safe_open(str(path), "pt") as handle:
            grafted = {key.rsplit(".personal_", 1)[0] for key in handle.keys()}  # noqa: SIM118
        assert grafted == layers


@pytest.mark.parametrize("model_type", ["llama4_text"])
def test_fedmoe_runs_end_to_end(model_type, tiny_folder, micro_config):
    folder = tiny_folder(model_type)
    result = run_experiment(
        micro_config(
            "algorithm.name=fedmoe",
            f'model.name="{folder}"',
            "algorithm.fedmoe.warmup_rounds=0",
            "algorithm.fedmoe.budget_fraction=0.8",  # the tiny model is mostly its 400-token embeddings
            *CHEAP,
        )
    )
    first, second = ok_rounds(result)
    assert first["client-0"]["status"] == "ok"  # the full-budget client profiles in round 1
    assert all(entry["status"] == "ok" for entry in second.values())
    sizes = sorted(entry["bytes_down"] for entry in second.values())
    assert sizes[0] < sizes[-1]  # the budget clients get sub-MoEs, smaller than the full model

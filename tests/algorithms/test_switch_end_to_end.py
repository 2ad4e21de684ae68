"""Every registry algorithm end to end on a tiny encoder-decoder MoE (Switch Transformers).

One random-weight Switch model (2 encoder and 2 decoder blocks, each stack with one sparse block of 4
experts) saved with the micro model's tokenizer; 2 clients, 1 round, 1 step, one evaluation example.
The seq2seq data path is chosen from the model's config; nothing in the run says it is one.
"""

import math

import pytest
import transformers
from safetensors.torch import load_file

from fedexperts.algorithms.registry import algorithm_names
from fedexperts.errors import FedExpertsError
from fedexperts.federation.inprocess import run_experiment
from fedexperts.models import tiny_model

CHEAP = (
    "federation.clients=2",
    "federation.rounds=1",
    "train.steps_per_round=1",
    "train.batch_size=2",
    "data.items=40",
    "eval.every=0",
    "eval.union_examples=0",
    "eval.probes=0",
    "eval.max_examples=1",
    "eval.max_new_tokens=2",
)

EXTRA = {
    "flex": ("algorithm.flex.top_n=1", "algorithm.flex.calibration_batches=1"),
    # two rounds: the full-budget client profiles in round 1, the others train sub-MoEs of the Switch
    "fedmoe": ("federation.rounds=2", "algorithm.fedmoe.warmup_rounds=0", "algorithm.fedmoe.budget_fraction=0.95"),
    "random-moe": ("federation.rounds=2", "algorithm.fedmoe.budget_fraction=0.95"),
    "fedavg": ("algorithm.server.rule=fedadam",),  # a server optimizer over the Switch's shared tensors
}
"""What an algorithm needs beyond its defaults on a 4-expert model that is mostly its embeddings."""

REFUSED = {"feddpa": "feddpa supports decoder-only models"}
"""Algorithms that cannot work on an encoder-decoder, and the start of their one-line refusal."""


@pytest.fixture(scope="module")
def switch_folder(micro_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("switch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(micro_model_path)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = tiny_model(
        "switch_transformers",
        vocab_size=len(tokenizer),
        num_experts=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        **ids,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_runs_on_switch(name, switch_folder, micro_config):
    config = micro_config(f"algorithm.name={name}", f'model.name="{switch_folder}"', *CHEAP, *EXTRA.get(name, ()))
    if name in REFUSED:
        with pytest.raises(FedExpertsError, match=REFUSED[name]):
            run_experiment(config)
        return
    result = run_experiment(config)
    rounds = result.records[1:-1]
    assert [line["kind"] for line in result.records] == ["run", *["round"] * config.federation.rounds, "final"]
    for record in rounds:
        assert all(entry["status"] == "ok" for entry in record["clients"].values()), record["clients"]
    for scores in result.records[-1]["clients"].values():
        assert scores["status"] == "ok" and math.isfinite(scores["own"]["loss"]) and scores["own"]["examples"] > 0
    if name == "fedavg":  # attention LoRA on every T5-style projection, cross-attention included
        checkpoint = sorted((result.run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
        adapted = {key.split(".lora_")[0] for key in load_file(checkpoint) if key.startswith("global/")}
        assert {key.rsplit(".", 1)[-1] for key in adapted} == {"q", "k", "v", "o"}
        assert any("EncDecAttention" in key for key in adapted) and any("encoder." in key for key in adapted)
    if name == "flex":  # every client grafted a personal expert module into the encoder's and the decoder's block
        for path in sorted((result.run_dir / "clients").glob("*.safetensors")):
            grafted = {key.rsplit(".personal_", 1)[0] for key in load_file(path)}
            assert grafted == {"encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"}
    if name in ("fedmoe", "random-moe"):  # the budget clients got sub-MoEs, smaller than the full model
        sizes = sorted(entry["bytes_down"] for entry in rounds[-1]["clients"].values())
        assert sizes[0] < sizes[-1]

"""Every registry algorithm end to end on a tiny encoder-decoder MoE (Switch Transformers).

One random-weight Switch model (``switch_model_path`` in tests/conftest.py: 2 encoder and 2 decoder
blocks, each stack with one sparse block of 4 experts) saved with the micro model's tokenizer;
2 clients, 1 round, 1 step, one evaluation example.
The seq2seq data path is chosen from the model's config; nothing in the run says it is one.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from fedexperts.algorithms.registry import algorithm_names
from fedexperts.errors import FedExpertsError
from fedexperts.federation.inprocess import run_experiment

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


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_runs_on_switch(name, switch_model_path, micro_config):
    config = micro_config(f"algorithm.name={name}", f'model.name="{switch_model_path}"', *CHEAP, *EXTRA.get(name, ()))
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
        held = sorted(entry["model_bytes"] for entry in rounds[-1]["clients"].values() if "model_bytes" in entry)
        if name == "fedmoe":  # both train (randomMoE's budget client sits stage 1 out, holding no model)
            assert held[0] < held[-1]  # and the sub-MoE's model held fewer weights
    assert set(result.records[0]["groups"]) == set(result.records[0]["clients"])


def test_fedmoe_clients_that_load_their_switch_sub_moe_give_the_shared_runs_results(
    switch_model_path, micro_config, monkeypatch
):
    """``federation.client_model=sub-moe`` (what Flower nodes use): each sub-MoE is read from the Switch
    checkpoint by global expert index, and the run equals the one on views of the shared model, bit for bit."""
    from fedexperts import experiment
    from tests.algorithms.fedmoe.test_end_to_end import checkpoint, stable

    overrides = (f'model.name="{switch_model_path}"', *CHEAP, *EXTRA["fedmoe"], "algorithm.name=fedmoe")
    shared = run_experiment(micro_config(*overrides, "name=shared"))
    kept = []
    original = experiment.load_sub_moe

    def counted(folder, keep, **options):
        kept.append(sum(len(experts) for experts in keep.values()))
        return original(folder, keep, **options)

    monkeypatch.setattr(experiment, "load_sub_moe", counted)
    loaded = run_experiment(micro_config(*overrides, "name=sub-moe", "federation.client_model=sub-moe"))
    assert kept and min(kept) < max(kept)  # sub-MoEs smaller than the full model were loaded
    assert stable(loaded.records[1:]) == stable(shared.records[1:])
    (a, meta_a), (b, meta_b) = checkpoint(shared.run_dir), checkpoint(loaded.run_dir)
    assert a.keys() == b.keys() and meta_a == meta_b
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

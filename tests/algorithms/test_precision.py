"""Float32 master weights over a bf16 base: what prepare casts, that small updates land, that eval runs."""

import pytest
import torch

from fedexperts.algorithms.registry import algorithm_names, build_algorithm, parse_algorithm
from fedexperts.config import TrainConfig
from fedexperts.data.expertbench import ExpertBench
from fedexperts.data.tokenize import IGNORE_INDEX
from fedexperts.evaluation import EvalSet, instruction_scores
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import tiny_model
from fedexperts.models.builtin import RECIPES, build_tokenizer
from fedexperts.moe.precision import compute_dtype
from fedexperts.training import train_local
from tests.algorithms.helpers import batches_for

ONE_STEP = TrainConfig(learning_rate=4e-5, steps_per_round=1, max_grad_norm=None)


def prepared_bf16(family, name, **settings):
    model = tiny_model(family).to(torch.bfloat16)
    algorithm = build_algorithm(parse_algorithm({"name": name, **settings}))
    algorithm.prepare(model)
    return model, algorithm


def client_model(algorithm, model, seed=0):
    """The model one client trains (FedMoE: its sub-MoE view), set up from the initial global state."""
    info = ClientInfo("c0", 4)
    received = decode(encode(algorithm.downlink(algorithm.initial_global_state(model), info)))
    batches = batches_for(model, seed)
    return algorithm.setup_client(model, received, None, LocalData(info, lambda: iter(batches))).model


@pytest.mark.parametrize(("family", "name"), [("olmoe", name) for name in algorithm_names()] + [("qwen2_moe", "flex")])
def test_after_prepare_what_trains_is_float32_and_the_frozen_base_stays_bf16(family, name):
    model, algorithm = prepared_bf16(family, name)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) <= {torch.bfloat16}
    assert compute_dtype(model) == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in algorithm.initial_global_state(model).values())


@pytest.mark.parametrize("name", ["fedmoe", "random-moe"])
def test_a_fedmoe_view_trains_float32_copies_of_its_rows_and_the_base_keeps_bf16(name):
    model, algorithm = prepared_bf16("olmoe", name)
    row = next(iter(algorithm.layout.rows))
    view = client_model(algorithm, model)
    if view is model:  # profiling: the client trains the dense part of the base itself
        pytest.skip("the first round profiles the full model")
    assert view.get_parameter(row).dtype == torch.float32 and view.get_parameter(row).requires_grad
    assert model.get_parameter(row).dtype == torch.bfloat16 and not model.get_parameter(row).requires_grad
    assert {p.dtype for p in view.parameters() if p.requires_grad} == {torch.float32}
    before = {n: p.detach().clone() for n, p in view.named_parameters() if p.requires_grad}
    train_local(view, batches_for(view, 1), ONE_STEP)
    assert any(not torch.equal(before[n], p) for n, p in view.named_parameters() if n in before)


def _changed(before, model, names):
    params = dict(model.named_parameters())
    return {name: float((before[name] != params[name]).float().mean()) for name in names}


@pytest.mark.parametrize(("family", "name"), [("qwen2_moe", "flex"), ("olmoe", "fedavg")])
def test_one_step_at_4e_5_moves_every_entry_whose_gradient_is_nonzero(family, name):
    """AdamW's first step moves each entry with a nonzero gradient by about the learning rate.

    In one step: every entry of every LoRA B, personal expert and gate tensor changes (their
    gradients are nonzero; LoRA A's is zero while B is zero). In a second step LoRA A's does too.
    """
    model, _ = prepared_bf16(family, name)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora_a = [n for n in trainable if ".lora_A." in n]
    first_step = [n for n in trainable if n not in lora_a]
    assert lora_a and first_step
    if name == "flex":
        assert any("personal_experts" in n for n in first_step) and any("personal_gate" in n for n in first_step)
    batches = batches_for(model, 0)
    train_local(model, batches, ONE_STEP)
    changed = _changed(trainable, model, first_step)
    assert changed == dict.fromkeys(first_step, 1.0)
    assert _changed(trainable, model, lora_a) == dict.fromkeys(lora_a, 0.0)  # B was zero: no gradient yet
    train_local(model, batches, ONE_STEP, round_index=0)
    assert _changed(trainable, model, lora_a) == dict.fromkeys(lora_a, 1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"])


def _eval_set(tokenizer):
    pairs = [("Question: Where does Maren live?\nAnswer:", " Varo"), ("Hi", " there friend")]
    rows = []
    for prompt, reference in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(reference)["input_ids"]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]})
    return EvalSet(tuple(p for p, _ in pairs), tuple(r for _, r in pairs), tuple(rows))


@pytest.mark.parametrize(
    ("family", "name"), [("qwen2_moe", "flex"), ("olmoe", "fedavg"), ("olmoe", "fedmoe"), ("olmoe", "feddpa")]
)
def test_evaluation_and_generation_run_on_a_bf16_base_with_float32_trainables(tokenizer, family, name):
    base = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).to(torch.bfloat16)
    settings = {"fedmoe": {"budget_fraction": 0.9}} if name == "fedmoe" else {}  # the tokenizer's embeddings
    algorithm = build_algorithm(parse_algorithm({"name": name, **settings}))
    algorithm.prepare(base)
    model = client_model(algorithm, base)
    train_local(model, batches_for(model, 0), ONE_STEP)  # LoRA B nonzero: the adapters take part
    scores = instruction_scores(model, tokenizer, _eval_set(tokenizer), max_new_tokens=3)
    assert scores.examples == 2 and torch.isfinite(torch.tensor(scores.loss))
    if name == "fedmoe":
        return  # its view's float32 routers need autocast (as training and evaluation run it)
    with torch.no_grad():  # a plain forward outside autocast: peft and the graft cast to their own dtype
        logits = model(input_ids=torch.tensor([tokenizer("Hi")["input_ids"]])).logits
    assert torch.isfinite(logits.float()).all()


def test_a_bf16_flex_run_end_to_end_keeps_float32_personal_and_global_state(micro_config):
    from safetensors.torch import load_file

    from fedexperts.federation.inprocess import run_experiment

    result = run_experiment(micro_config("algorithm.name=flex", "model.dtype=bfloat16"))
    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    for record in result.records[1:3]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())
    states = sorted((result.run_dir / "clients").glob("*.safetensors"))
    assert len(states) == 3
    for path in states:
        tensors = load_file(path)
        assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    checkpoint = sorted((result.run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    shared = {k: t for k, t in load_file(checkpoint).items() if k.startswith("global/")}
    assert shared and {t.dtype for t in shared.values()} == {torch.float32}
    for scores in result.records[-1]["clients"].values():
        assert 0.0 <= scores["own"]["rouge_l"] <= 1.0

import importlib
import math

import pytest
import torch

from fedexperts.config import TrainConfig
from fedexperts.data import IGNORE_INDEX
from fedexperts.errors import FedExpertsError
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers, select_experts
from fedexperts.training import (
    DivergenceError,
    causal_lm_loss,
    cosine_learning_rate,
    load_balancing_loss,
    train_local,
)


def batches(model, count=2, batch=4, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
        labels = ids.clone()
        labels[:, : length // 2] = IGNORE_INDEX  # prompt tokens carry no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def freeze_experts(model):
    for layer in moe_layers(model):
        layer.experts.requires_grad_(False)


def test_training_lowers_the_loss_and_touches_only_trainable_parameters():
    torch.manual_seed(0)
    model = tiny_model("olmoe")
    freeze_experts(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = batches(model, count=1)
    first = train_local(model, data, TrainConfig(learning_rate=3e-3, steps_per_round=1))
    later = train_local(model, data, TrainConfig(learning_rate=3e-3, steps_per_round=30))
    assert later.loss < first.loss * 0.8
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for p in model.parameters())
    assert first.tokens == 4 * 6 and first.steps == 1
    assert not model.training


def test_same_seed_same_weights():
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_model("mixtral", seed=1)
        train_local(model, batches(model), TrainConfig(steps_per_round=3))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_gradient_accumulation_matches_one_big_batch():
    small = tiny_model("qwen3_moe")
    big = tiny_model("qwen3_moe")
    data = batches(small, count=1, batch=4)[0]
    halves = [{k: v[:2] for k, v in data.items()}, {k: v[2:] for k, v in data.items()}]
    train_local(small, halves, TrainConfig(steps_per_round=1, grad_accumulation=2, max_grad_norm=None))
    train_local(big, [data], TrainConfig(steps_per_round=1, max_grad_norm=None))
    for (name, a), b in zip(small.named_parameters(), big.parameters(), strict=True):
        # AdamW's first step is about lr * sign(g): a coordinate whose gradient is near zero can move by a
        # visible fraction of lr when summation order changes, so the bound is 1% of the step (lr 0.005)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)


def test_zero_proximal_term_changes_nothing():
    plain, prox = tiny_model("olmoe"), tiny_model("olmoe")
    data = batches(plain)
    train_local(plain, data, TrainConfig(steps_per_round=2))
    train_local(prox, data, TrainConfig(steps_per_round=2), proximal=lambda _: torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), prox.parameters(), strict=True))


def test_cosine_schedule_spans_rounds():
    def rate(step):
        return cosine_learning_rate(step, peak=1.0, floor_fraction=0.0, warmup_steps=2, total_steps=10 * 4)

    assert rate(0) == pytest.approx(0.5)
    assert rate(2) == pytest.approx(1.0)
    assert rate(21) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 38)))
    assert rate(40) == pytest.approx(0.0)
    assert rate(10) < rate(9)
    assert cosine_learning_rate(40, peak=2.0, floor_fraction=0.1, warmup_steps=0, total_steps=40) == pytest.approx(0.2)


def test_label_smoothing_and_masked_labels():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 3:] = 1
    plain = causal_lm_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, 2:4].reshape(-1, 7), labels[:, 3:].reshape(-1))
    torch.testing.assert_close(plain, expected)
    assert causal_lm_loss(logits, labels, label_smoothing=0.1) != plain


def test_load_balancing_loss_is_one_when_balanced_and_handles_sub_moes():
    uniform = torch.zeros(8, 4)
    # equal logits: P_i = 1/4, top-1 picks expert 0 everywhere -> f = (1, 0, 0, 0) -> 4 * 1/4 = 1
    assert load_balancing_loss([(uniform, 1)], None).item() == pytest.approx(1.0)
    model = tiny_model("olmoe")
    first, second, _ = (layer.name for layer in moe_layers(model))
    select_experts(model, {first: [0, 1, 2], second: [1, 2, 3, 4, 5]})
    result = train_local(model, batches(model), TrainConfig(steps_per_round=2, router_aux_loss_coef=0.01))
    assert math.isfinite(result.loss)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral"])
@pytest.mark.parametrize("masked", [False, True])
def test_pooled_load_balancing_loss_is_transformers_own(family, masked):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(2 * 5, 6, generator=generator) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.long)
    if masked:
        mask[1, 2:] = 0
    expected = module.load_balancing_loss_func(tuple(layers), 6, 2, mask if masked else None)
    for formulation in ("pooled", "auto"):
        got = load_balancing_loss([(logits, 2) for logits in layers], mask if masked else None, formulation)
        torch.testing.assert_close(got, expected.float())
    per_layer = load_balancing_loss([(logits, 2) for logits in layers], mask if masked else None, "per-layer")
    assert not torch.allclose(per_layer, expected.float())


def test_unequal_layers_fall_back_to_per_layer_or_are_refused():
    layers = [(torch.randn(8, 4), 1), (torch.randn(8, 6), 1)]
    per_layer = load_balancing_loss(layers, None, "per-layer")
    torch.testing.assert_close(load_balancing_loss(layers, None, "auto"), per_layer)
    with pytest.raises(FedExpertsError, match="router_aux_loss=pooled needs one expert count"):
        load_balancing_loss(layers, None, "pooled")
    assert TrainConfig().router_aux_loss == "auto"
    model = tiny_model("olmoe")
    result = train_local(
        model, batches(model), TrainConfig(steps_per_round=2, router_aux_loss_coef=0.01, router_aux_loss="pooled")
    )
    assert math.isfinite(result.loss)


def test_bf16_autocast_and_gradient_checkpointing_run():
    model = tiny_model("olmoe")
    result = train_local(model, batches(model), TrainConfig(steps_per_round=1, bf16=True, gradient_checkpointing=True))
    assert math.isfinite(result.loss)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_bad_training_inputs_are_clear_errors():
    model = tiny_model("olmoe")
    with pytest.raises(FedExpertsError, match="training split is empty"):
        train_local(model, [], TrainConfig(steps_per_round=1))
    model.requires_grad_(False)
    with pytest.raises(FedExpertsError, match="no trainable parameters"):
        train_local(model, batches(model), TrainConfig())
    model.requires_grad_(True)
    with pytest.raises(FedExpertsError, match="loss became nan"):
        train_local(model, batches(model), TrainConfig(), proximal=lambda _: torch.tensor(float("nan")))


def test_a_learning_rate_far_too_large_is_divergence_not_an_ok_update():
    """At lr=1e6 Adam moves every weight by ~1e6 in one step: the loss saturates and stays flat, the weights explode."""
    model = tiny_model("olmoe")
    with pytest.raises(DivergenceError, match=r"^c1 diverged: the trainable weights' RMS went from .* at step 1 of 3 "):
        train_local(model, batches(model), TrainConfig(learning_rate=1e6, steps_per_round=3), description="c1")
    assert not model.training and all(p.grad is None for p in model.parameters())  # ready for the next client


def test_a_non_finite_loss_names_the_step_and_the_remedy():
    model = tiny_model("olmoe")
    with pytest.raises(DivergenceError, match=r"c1 diverged: the loss became nan at step 1 of 2; lower train"):
        train_local(
            model,
            batches(model),
            TrainConfig(steps_per_round=2),
            proximal=lambda _: torch.tensor(math.nan),
            description="c1",
        )

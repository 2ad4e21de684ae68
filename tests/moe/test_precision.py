"""The precision helpers: float32 masters in place, the compute dtype, and which autocast runs."""

from contextlib import nullcontext

import torch
from torch import nn

from fedexperts.models import tiny_model
from fedexperts.moe import graft_personal_experts
from fedexperts.moe.precision import autocast_for, compute_dtype, float32_masters, master_copy, to_master


def test_to_master_keeps_the_parameter_object_and_its_attributes():
    parameter = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    parameter.marker = True
    assert to_master(parameter) is torch.bfloat16
    assert parameter.dtype == torch.float32 and parameter.marker and parameter.requires_grad
    assert to_master(parameter) is None  # already float32
    assert master_copy(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    assert master_copy(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_only_trainable_parameters_become_float32_and_the_compute_dtype_is_remembered():
    model = tiny_model("olmoe").to(torch.bfloat16)
    model.requires_grad_(True)  # a dense model: nothing frozen stays to tell the base's dtype
    float32_masters(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert compute_dtype(model) == torch.bfloat16
    assert compute_dtype(tiny_model("olmoe").to(torch.float16)) == torch.float16
    assert compute_dtype(tiny_model("olmoe")) is None


def test_autocast_for_a_float32_model_is_nothing_unless_bf16_is_asked():
    model = tiny_model("olmoe")
    assert isinstance(autocast_for(model), nullcontext)
    assert isinstance(autocast_for(model, bf16=True), torch.autocast)
    assert isinstance(autocast_for(tiny_model("olmoe").to(torch.bfloat16)), torch.autocast)


def test_float32_personal_experts_over_a_bf16_base_run_with_and_without_autocast(batch_factory):
    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    graft_personal_experts(model, {"model.layers.0.mlp": [0, 1]})
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("personal_" in name)
    float32_masters(model)
    batch = batch_factory(model)
    with torch.no_grad():
        plain = model(**batch).logits
        with autocast_for(model):
            autocast = model(**batch).logits
    assert plain.dtype == autocast.dtype == torch.bfloat16
    torch.testing.assert_close(plain.float(), autocast.float(), atol=0.1, rtol=0.1)

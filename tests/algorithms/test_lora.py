"""LoRA factors and adapters read from peft's layers."""

import peft
import pytest

from fedexperts.algorithms import FedAvg
from fedexperts.algorithms.base import attention_linear_names
from fedexperts.algorithms.lora import LoraFactor, lora_layers, lora_tensors
from fedexperts.models import tiny_model


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_every_lora_parameter_is_named_with_its_layer_adapter_and_factor():
    model = tiny_model("olmoe")
    FedAvg().prepare(model)
    targets = attention_linear_names(tiny_model("olmoe"))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    peft.inject_adapter_in_model(config, model, adapter_name="second")
    tensors = lora_tensors(model)
    parameters = dict(model.named_parameters())
    assert {name for name in parameters if ".lora_" in name} == set(tensors)
    layers = dict(lora_layers(model))
    assert set(layers) == set(targets)
    for name, tensor in tensors.items():
        layer = layers[tensor.layer]
        container = layer.lora_A if tensor.factor is LoraFactor.A else layer.lora_B
        assert container[tensor.adapter].weight is parameters[name]
    assert {(t.adapter, t.factor) for t in tensors.values()} == {
        (adapter, factor) for adapter in ("default", "second") for factor in LoraFactor
    }
    rank = {t.adapter: parameters[n].shape[0] for n, t in tensors.items() if t.factor is LoraFactor.A}
    assert rank == {"default": 8, "second": 2}

"""plan() on the meta model against the same round played on the real tiny model, byte for byte."""

import pytest
import torch

from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.registry import build_algorithm, parse_algorithm
from fedexperts.federation import encode
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.models.tiny import tiny_config
from fedexperts.moe import Role, parameter_kinds
from fedexperts.planning import plan


def _count_by_role(model, roles):
    counts = dict.fromkeys(Role, 0)
    for name, parameter in model.named_parameters():
        counts[roles[name]] += parameter.numel()
    return counts


_ALGORITHMS = [
    {"name": "fedavg"},
    {"name": "fedprox", "scope": "non-expert"},
    {"name": "local", "lora": {"rank": 4}},
    {"name": "dense"},
    {"name": "fedsa-lora"},
    {"name": "ffa-lora"},
    {"name": "feddpa"},
]


@pytest.mark.parametrize("settings", _ALGORITHMS, ids=lambda settings: settings["name"])
@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "deepseek_v2", "gpt_oss", "switch_transformers"])
def test_plan_on_meta_equals_the_real_tiny_model(tmp_path, model_type, settings):
    if settings["name"] == "feddpa" and model_type == "switch_transformers":
        pytest.skip("FedDPA refuses encoder-decoder models")
    assert_plan_equals_the_real_model(tmp_path, model_type, settings)


@pytest.mark.parametrize(
    "model_type",
    [
        t
        for t in (
            "qwen3_next",
            "qwen3_5_moe_text",
            "granitemoeshared",
            "granitemoehybrid",
            "jamba",
            "lfm2_moe",
            "flex_olmo",
        )
        if t in TINY_FAMILIES
    ],
)
def test_plan_of_a_tiny_hybrid_config_folder_equals_its_real_model(tmp_path, model_type):
    """``fedexperts plan`` on a tiny config folder of each type: attention LoRA on every layer's token mixer."""
    assert_plan_equals_the_real_model(tmp_path, model_type, {"name": "fedavg"})


def assert_plan_equals_the_real_model(tmp_path, model_type, settings):
    tiny_config(model_type).to_json_file(tmp_path / "config.json")
    config = parse_algorithm(settings)
    result = plan(tmp_path, config, dtype="float32", examples=321)

    model = tiny_model(model_type)
    algorithm = build_algorithm(config)
    algorithm.prepare(model)
    client = ClientInfo("client-0", 321)
    received = algorithm.downlink(algorithm.initial_global_state(model), client)
    context = algorithm.setup_client(model, received, None, LocalData(client))
    sent = algorithm.uplink(context)
    personal = algorithm.personal_state(context)

    assert result.downlink_bytes == len(encode(received))
    assert result.uplink_bytes == len(encode(sent))
    assert result.personal_bytes == (0 if personal is None else len(encode(personal)))
    assert dict(result.by_role) == _count_by_role(model, algorithm.roles)
    assert result.total_params == sum(p.numel() for p in model.parameters())
    assert result.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    kinds = parameter_kinds(model)
    for row in result.by_kind:
        expected = sum(
            p.numel()
            for n, p in model.named_parameters()
            if (kinds[n].kind.value, kinds[n].adapter) == (row.kind, row.adapter)
        )
        assert row.params == expected
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    assert result.memory.weights == weights


@pytest.mark.parametrize("transfer", [None, "bfloat16"])
def test_plan_in_bf16_equals_the_real_bf16_model_with_lora(tmp_path, transfer):
    tiny_config("qwen3_moe").to_json_file(tmp_path / "config.json")
    config = FlexConfig()
    result = plan(tmp_path / "config.json", config, dtype="bf16", transfer_dtype=transfer)

    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    algorithm = build_algorithm(config)
    algorithm.prepare(model)
    client = ClientInfo("client-0", 1000)
    received = algorithm.downlink(algorithm.initial_global_state(model), client)
    context = algorithm.setup_client(model, received, None, LocalData(client))
    wire = None if transfer is None else torch.bfloat16
    assert result.downlink_bytes == len(encode(received, dtype=wire))
    assert result.uplink_bytes == len(encode(algorithm.uplink(context), dtype=wire))
    personal = algorithm.personal_state(context)
    assert personal is not None and result.personal_bytes == len(encode(personal))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}  # float32 masters over the bf16 base
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert result.memory.gradients == sum(p.numel() * 4 for p in trainable)
    assert result.memory.optimizer == 2 * result.memory.gradients + 4 * len(trainable)

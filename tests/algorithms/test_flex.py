import copy

import pytest
import torch
from pydantic import ValidationError

from fedexperts.algorithms import FLEx, RandomExpert, grafted_experts
from fedexperts.algorithms.flex import algorithm as flex_algorithm
from fedexperts.algorithms.flex.config import FlexConfig, FlexOptions
from fedexperts.config import TrainConfig
from fedexperts.errors import FedExpertsError
from fedexperts.federation.inprocess import run_experiment
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData
from fedexperts.models import tiny_model
from fedexperts.moe import ParamKind, Role, moe_layers, parameter_kinds, reconstruction_losses
from fedexperts.training import train_local
from tests.algorithms.helpers import batches_for


def local_data(model, name, seed, round_number=1):
    batches = batches_for(model, seed)
    return LocalData(ClientInfo(name, 8), lambda: iter(batches), round_number)


def client_round(algorithm, model, global_state, name, seed, personal=None, round_number=1):
    info = ClientInfo(name, 8)
    received = algorithm.downlink(global_state, info)
    data = local_data(model, name, seed, round_number)
    context = algorithm.setup_client(model, received, personal, data)
    torch.manual_seed(seed)
    train_local(context.model, list(data.batches()), TrainConfig(steps_per_round=3, learning_rate=5e-2))
    return ClientUpdate(info, algorithm.uplink(context)), algorithm.personal_state(context)


def prepared(model_type="olmoe", **options):
    model = tiny_model(model_type)
    pristine = copy.deepcopy(model)
    algorithm = FLEx(FlexConfig(flex=FlexOptions(**options)))
    algorithm.prepare(model)
    return algorithm, model, pristine


def test_only_attention_lora_is_sent_personal_parts_stay_home():
    algorithm, model, _ = prepared()
    start = algorithm.initial_global_state(model)
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    kinds = parameter_kinds(model)
    assert update.payload.tensors and set(update.payload.tensors) == set(start)
    for name in update.payload.tensors:
        assert kinds[name].kind is ParamKind.ATTENTION and kinds[name].adapter
        assert "personal" not in name and "experts" not in name and "gate" not in name
    assert personal is not None and personal.tensors
    assert {kinds[name].kind for name in personal.tensors} == {ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE}
    assert personal.metadata["grafted"].keys() == {layer.name for layer in moe_layers(model)}


@pytest.mark.parametrize("criterion", ["per-batch", "pooled"])
def test_the_graft_is_the_expert_that_best_reconstructs_the_pretrained_layer(criterion):
    algorithm, model, pristine = prepared(criterion=criterion)
    start = algorithm.initial_global_state(model)
    data = local_data(model, "a", seed=3)
    algorithm.setup_client(model, algorithm.downlink(start, data.client), None, data)
    inputs = [{k: v for k, v in batch.items() if k != "labels"} for batch in data.batches()]
    losses = reconstruction_losses(pristine, inputs, criterion=criterion)
    expected = {name: (choice.best,) for name, choice in losses.items()}
    assert grafted_experts(model) == expected
    for layer, original in zip(moe_layers(model), moe_layers(pristine), strict=True):
        chosen = expected[layer.name][0]
        gate = layer.block.personal_gate
        torch.testing.assert_close(gate.weight[0], original.family.router_weight(original.router)[chosen])
        for tensor_name in layer.family.expert_tensors:
            copied = layer.block.personal_experts.get_parameter(tensor_name)[0]
            torch.testing.assert_close(copied, original.experts.get_parameter(tensor_name)[chosen])


def test_a_clients_personal_expert_is_exactly_what_it_trained_and_pretrained_weights_stay_frozen():
    algorithm, model, pristine = prepared()
    global_state = algorithm.initial_global_state(model)
    a1, a_state = client_round(algorithm, model, global_state, "a", seed=1)
    b1, b_state = client_round(algorithm, model, global_state, "b", seed=2)
    global_state = algorithm.aggregate(global_state, [a1, b1])
    # a's next round starts from exactly what a trained, not from b's values nor an average
    info = ClientInfo("a", 8)
    algorithm.setup_client(model, algorithm.downlink(global_state, info), a_state, local_data(model, "a", 1, 2))
    current = dict(model.named_parameters())
    for name, tensor in a_state.tensors.items():
        assert torch.equal(current[name], tensor)
        assert not torch.equal(tensor, b_state.tensors[name]) or "gate" in name
    frozen = {n for n, role in algorithm.roles.items() if role is Role.FROZEN}
    original = dict(pristine.named_parameters())
    for name in frozen:
        assert torch.equal(current[name], original[name.replace(".base_layer", "")]), name


def test_top_n_refresh_and_shared_gate_options():
    algorithm, model, _ = prepared(top_n=2, share_gate=True, refresh_every=2)
    start = algorithm.initial_global_state(model)
    assert any("personal_gate" in name for name in start)
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    assert any("personal_gate" in name for name in update.payload.tensors)
    assert not any("personal_experts" in name for name in update.payload.tensors)
    assert all(len(chosen) == 2 for chosen in personal.metadata["grafted"].values())
    assert personal.metadata["selected_round"] == 1
    _, kept = client_round(algorithm, model, start, "a", seed=1, personal=personal, round_number=2)
    assert kept.metadata["selected_round"] == 1
    _, refreshed = client_round(algorithm, model, start, "a", seed=1, personal=kept, round_number=3)
    assert refreshed.metadata["selected_round"] == 3


def test_the_default_criterion_is_the_papers_sum_of_per_batch_norms():
    assert FlexOptions().criterion == "per-batch"
    assert FlexOptions().calibration_tokens is None


def test_calibration_tokens_takes_the_first_batches_up_to_that_many_real_tokens(monkeypatch):
    algorithm, model, _ = prepared(calibration_tokens=25)
    batches = batches_for(model, seed=4, count=5)
    for batch in batches:
        batch["attention_mask"][:, 9:] = 0  # 4 rows x 9 real tokens = 36 per batch, 12 of them padding
        batch["attention_mask"][1:, 3:] = 0  # now 9 + 3 x 3 = 18 real tokens per batch
    seen = []
    original = flex_algorithm.reconstruction_losses

    def spy(model, inputs, **options):
        inputs = list(inputs)
        seen.append([int(batch["attention_mask"].sum()) for batch in inputs])
        return original(model, inputs, **options)

    monkeypatch.setattr(flex_algorithm, "reconstruction_losses", spy)
    data = LocalData(ClientInfo("a", 8), lambda: iter(batches), 1)
    algorithm.setup_client(model, algorithm.downlink(algorithm.initial_global_state(model), data.client), None, data)
    assert seen == [[18, 18]]  # 18 < 25, 36 >= 25: the second batch is used whole, the rest not at all
    # fewer real tokens than asked: every batch; no calibration_tokens: calibration_batches=4
    for options, used in (({"calibration_tokens": 10_000}, 5), ({}, 4)):
        other, other_model, _ = prepared(**options)
        start = other.initial_global_state(other_model)
        other.setup_client(other_model, other.downlink(start, data.client), None, data)
        assert seen[-1] == [18] * used


def test_bad_options_are_refused():
    with pytest.raises(ValidationError, match="top_n"):
        FlexOptions(top_n=0)
    with pytest.raises(ValidationError, match=r"calibration_batches or flex\.calibration_tokens, not both"):
        FlexOptions(calibration_batches=2, calibration_tokens=100)
    with pytest.raises(ValidationError, match="criterion"):
        FlexOptions(criterion="mean")
    with pytest.raises(ValidationError, match="'everything' would share the frozen pretrained experts"):
        FlexConfig(scope="everything")
    algorithm = FLEx(FlexConfig(flex=FlexOptions(top_n=9)))
    with pytest.raises(FedExpertsError, match="top_n=9 exceeds"):
        algorithm.prepare(tiny_model("olmoe"))


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss", "mixtral"])
def test_other_families_graft_train_and_send_lora_only(model_type):
    algorithm, model, _ = prepared(model_type)
    start = algorithm.initial_global_state(model)
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    assert set(update.payload.tensors) == set(start)
    assert all(torch.isfinite(t).all() for t in personal.tensors.values())


def test_flex_end_to_end_with_personal_state_on_disk(micro_config):
    result = run_experiment(micro_config("algorithm.name=flex"))
    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    states = sorted((result.run_dir / "clients").glob("*.safetensors"))
    assert [path.stem for path in states] == ["client-0", "client-1", "client-2"]
    run = result.records[0]
    assert run["parameters"]["personal"] > 0 and run["parameters"]["shared"] > 0


def test_random_expert_baseline_trains_and_sends_only_the_chosen_rows():
    model = tiny_model("olmoe")
    pristine = dict(copy.deepcopy(model).named_parameters())
    algorithm = RandomExpert()
    algorithm.prepare(model)
    start = algorithm.initial_global_state(model)
    assert {key.split("@")[1] for key in start if "@" in key} <= {f"expert={e}" for e in range(8)}
    info = ClientInfo("a", 8)
    batches = batches_for(model, 1)
    context = algorithm.setup_client(model, algorithm.downlink(start, info), None, LocalData(info))
    train_local(model, batches, TrainConfig(steps_per_round=3, learning_rate=5e-2, weight_decay=0.1))
    sent = algorithm.uplink(context).tensors
    assert set(sent) == set(start)
    params = dict(model.named_parameters())
    for name, expert in algorithm.chosen.items():
        current, original = params[name], pristine[name]
        others = [row for row in range(current.shape[0]) if row != expert]
        assert torch.equal(current[others], original[others]), name  # untouched rows stay bit-identical
        assert not torch.equal(current[expert], original[expert])
        torch.testing.assert_close(sent[f"{name}@expert={expert}"], current[expert])


def numel(payload):
    return sum(tensor.numel() for tensor in payload.tensors.values())


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_lora_personal_training_keeps_only_adapters_and_the_grafted_copy_frozen(model_type):
    lora = {"rank": 2, "alpha": 4, "dropout": 0.05}
    algorithm, model, pristine = prepared(model_type, personal_training="lora", personal_lora=lora)
    start = algorithm.initial_global_state(model)
    update, personal = client_round(algorithm, model, start, "a", seed=1)
    kinds = parameter_kinds(model)
    assert set(update.payload.tensors) == set(start)
    assert all(kinds[name].kind is ParamKind.ATTENTION and kinds[name].adapter for name in start)
    assert personal.tensors and all(kinds[name].adapter for name in personal.tensors)
    assert {kinds[name].kind for name in personal.tensors} == {ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE}
    assert all(tensor.dtype is torch.float32 for tensor in personal.tensors.values())
    trained_b = [tensor for name, tensor in personal.tensors.items() if "lora_B" in name]
    assert trained_b and all(tensor.abs().sum() > 0 for tensor in trained_b)  # B starts at zero
    full, full_model, _ = prepared(model_type)
    _, full_personal = client_round(full, full_model, full.initial_global_state(full_model), "a", seed=1)
    assert numel(personal) < numel(full_personal) / 2
    # the grafted copy and gate are bit-identical to the pretrained expert and router row
    chosen = personal.metadata["grafted"]
    for layer, original in zip(moe_layers(model), moe_layers(pristine), strict=True):
        index = chosen[layer.name][0]
        for tensor_name in layer.family.expert_tensors:
            copied = layer.block.personal_experts.get_parameter(tensor_name)[0]
            assert torch.equal(copied, original.experts.get_parameter(tensor_name)[index])
        gate = layer.block.personal_gate
        assert torch.equal(gate.weight[0], original.family.router_weight(original.router)[index])
    # the next round starts from exactly the kept adapters, on copies of the saved choice
    info = ClientInfo("a", 8)
    algorithm.setup_client(model, algorithm.downlink(start, info), personal, local_data(model, "a", 1, 2))
    current = dict(model.named_parameters())
    assert all(torch.equal(current[name], tensor) for name, tensor in personal.tensors.items())
    assert grafted_experts(model) == {name: tuple(experts) for name, experts in chosen.items()}


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("training", ["full", "lora"])
def test_gate_bias_off_leaves_the_gate_without_a_bias(model_type, training):
    algorithm, model, _ = prepared(model_type, gate_bias=False, personal_training=training)
    assert all(layer.block.personal_gate.bias is None for layer in moe_layers(model))
    assert not any("personal_gate" in name and name.endswith("bias") for name, _ in model.named_parameters())
    update, personal = client_round(algorithm, model, algorithm.initial_global_state(model), "a", seed=1)
    assert personal.tensors and all(torch.isfinite(t).all() for t in personal.tensors.values())
    assert not any("personal" in name for name in update.payload.tensors)


def test_personal_lora_options_need_lora_training():
    assert FlexOptions().personal_training == "full" and FlexOptions().gate_bias
    with pytest.raises(ValidationError, match=r"personal_lora applies with flex\.personal_training=lora only"):
        FlexOptions(personal_lora={"rank": 4})


def test_flex_rounds_on_a_hybrid_model_share_lora_of_both_token_mixers():
    """Qwen3-Next (Gated DeltaNet and softmax-attention layers): two clients train, the server averages."""
    algorithm, model, pristine = prepared("qwen3_next")
    start = algorithm.initial_global_state(model)
    assert {name.split(".")[3] for name in start} == {"linear_attn", "self_attn"}  # model.layers.N.<mixer>...
    a, a_state = client_round(algorithm, model, start, "a", seed=1)
    b, _ = client_round(algorithm, model, start, "b", seed=2)
    merged = algorithm.aggregate(start, [a, b])
    moved = {name.split(".")[3] for name in start if not torch.equal(merged[name], start[name])}
    assert moved == {"linear_attn", "self_attn"}
    kinds = parameter_kinds(model)
    assert {kinds[name].kind for name in a_state.tensors} == {ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE}
    assert all(torch.isfinite(tensor).all() for tensor in a_state.tensors.values())
    original = dict(pristine.named_parameters())
    for name, parameter in model.named_parameters():  # the base, the Gated DeltaNet's own weights included
        if algorithm.roles[name] is Role.FROZEN:
            assert torch.equal(parameter, original[name.replace(".base_layer", "")]), name

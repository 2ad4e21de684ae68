import pytest
import torch
from pydantic import ValidationError

from fedexperts.algorithms import FedAvg, FedProx, LocalOnly, LoraConfig, MoEAsDense, SharedScope
from fedexperts.algorithms.fedavg.config import FedAvgConfig, FedProxConfig
from fedexperts.config import TrainConfig
from fedexperts.data import IGNORE_INDEX
from fedexperts.errors import FedExpertsError
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData, Payload
from fedexperts.models import tiny_model
from fedexperts.moe import ParamKind, Role, parameter_kinds
from fedexperts.training import train_local


def client_batches(model, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 10), generator=generator)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def run_client(algorithm, model, global_state, client, seed, personal=None, steps=3):
    received = algorithm.downlink(global_state, client)
    context = algorithm.setup_client(model, received, personal, LocalData(client))
    torch.manual_seed(seed)
    train_local(
        context.model,
        client_batches(model, seed),
        TrainConfig(steps_per_round=steps, learning_rate=1e-2),
        proximal=algorithm.proximal_term(context),
    )
    return ClientUpdate(client, algorithm.uplink(context)), algorithm.personal_state(context)


def prepared(algorithm, model_type="olmoe"):
    model = tiny_model(model_type)
    algorithm.prepare(model)
    return model


def test_attention_lora_is_injected_in_place_and_is_the_only_trainable_part():
    algorithm = FedAvg()
    model = prepared(algorithm)
    kinds = parameter_kinds(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {name for name, role in algorithm.roles.items() if role is Role.SHARED}
    assert all(kinds[name].adapter and kinds[name].kind is ParamKind.ATTENTION for name in trainable)
    assert {name.split(".")[4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(algorithm.initial_global_state(model)) == trainable
    assert type(model).__name__ == "OlmoeForCausalLM"  # not wrapped: names stay the model's own


@pytest.mark.parametrize(
    ("model_type", "targets"), [("olmoe", ["q_proj", "k_proj", "v_proj"]), ("switch_transformers", ["q", "v"])]
)
def test_lora_targets_keep_only_the_named_attention_projections(model_type, targets):
    algorithm = FedAvg(FedAvgConfig(lora=LoraConfig(rank=2, targets=targets)))
    prepared(algorithm, model_type)
    shared = [name for name, role in algorithm.roles.items() if role is Role.SHARED]
    assert shared and {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in shared} == set(targets)


def test_a_lora_target_that_matches_nothing_is_refused():
    with pytest.raises(ValidationError, match="at least 1 item"):
        LoraConfig(targets=[])
    algorithm = FedAvg(FedAvgConfig(lora=LoraConfig(targets=["q_proj", "k_proj"])))
    refused = r"algorithm\.lora\.targets \['k_proj'\] match no attention linear of deepseek_v2"
    with pytest.raises(FedExpertsError, match=refused):
        prepared(algorithm, "deepseek_v2")


def test_switch_attention_targets_include_cross_attention():
    algorithm = FedAvg(FedAvgConfig(lora=LoraConfig(rank=2)))
    prepared(algorithm, "switch_transformers")
    shared = [name for name, role in algorithm.roles.items() if role is Role.SHARED]
    assert any("EncDecAttention" in name for name in shared)


def test_one_round_of_fedavg_is_the_example_weighted_average_of_clients():
    algorithm = FedAvg()
    model = prepared(algorithm)
    start = algorithm.initial_global_state(model)
    a, _ = run_client(algorithm, model, start, ClientInfo("a", 10), seed=1)
    b, _ = run_client(algorithm, model, start, ClientInfo("b", 30), seed=2)
    new = algorithm.aggregate(start, [a, b])
    for name in start:
        expected = 0.25 * a.payload.tensors[name] + 0.75 * b.payload.tensors[name]
        torch.testing.assert_close(new[name], expected)
    assert not torch.equal(a.payload.tensors[name], b.payload.tensors[name])


def test_identical_clients_aggregate_to_their_update_and_clients_do_not_leak():
    algorithm = FedAvg()
    model = prepared(algorithm)
    start = algorithm.initial_global_state(model)
    first, _ = run_client(algorithm, model, start, ClientInfo("a", 5), seed=7)
    second, _ = run_client(algorithm, model, start, ClientInfo("b", 9), seed=7)  # same data, same seed
    for name in start:
        assert torch.equal(first.payload.tensors[name], second.payload.tensors[name])
    new = algorithm.aggregate(start, [first, second])
    assert all(torch.equal(new[name], first.payload.tensors[name]) for name in start)


def test_fedprox_with_zero_mu_equals_fedavg_and_positive_mu_stays_closer():
    updates = {}
    algorithms = FedAvg(), FedProx(FedProxConfig(mu=0.0)), FedProx(FedProxConfig(mu=5.0))
    for label, algorithm in zip(("avg", "prox0", "prox"), algorithms, strict=True):
        model = prepared(algorithm)
        start = algorithm.initial_global_state(model)
        update, _ = run_client(algorithm, model, start, ClientInfo("a", 4), seed=3, steps=5)
        updates[label] = (start, update.payload.tensors)
    start, avg = updates["avg"]
    assert all(torch.equal(avg[name], updates["prox0"][1][name]) for name in avg)

    def distance(tensors):
        return sum(((tensors[name] - start[name]) ** 2).sum() for name in start)

    assert distance(updates["prox"][1]) < distance(avg)


def test_local_only_keeps_state_home_and_new_clients_start_fresh():
    algorithm = LocalOnly()
    model = prepared(algorithm)
    assert algorithm.initial_global_state(model) == {}
    update, personal = run_client(algorithm, model, {}, ClientInfo("a", 4), seed=1)
    assert update.payload.tensors == {} and personal is not None and personal.tensors
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if name in personal.tensors}
    algorithm.setup_client(model, Payload({}), None, LocalData(ClientInfo("b", 4)))  # a new client
    changed = [
        name for name, p in model.named_parameters() if name in personal.tensors and not torch.equal(p, initial[name])
    ]
    assert changed, "a new client must not inherit the previous client's trained state"
    algorithm.setup_client(model, Payload({}), personal, LocalData(ClientInfo("a", 4)))  # client a returns
    assert all(torch.equal(p, personal.tensors[n]) for n, p in model.named_parameters() if n in personal.tensors)
    assert algorithm.aggregate({}, [update]) == {}


def test_dense_shares_every_weight_and_non_expert_scope_leaves_routed_experts_frozen():
    dense = MoEAsDense()
    model = prepared(dense)
    assert set(dense.initial_global_state(model)) == {name for name, _ in model.named_parameters()}
    scoped = FedAvg(FedAvgConfig(scope=SharedScope.NON_EXPERT))
    model = prepared(scoped)
    kinds = parameter_kinds(model)
    shared = {name for name, role in scoped.roles.items() if role is Role.SHARED}
    assert {kinds[name].kind for name in shared} >= {ParamKind.ATTENTION, ParamKind.ROUTER, ParamKind.EMBEDDING}
    assert not any(kinds[name].kind is ParamKind.ROUTED_EXPERT for name in shared)


def test_misuse_is_reported():
    with pytest.raises(ValidationError, match=r"algorithm\.lora applies to scope attention-lora only, not 'attention'"):
        FedAvgConfig(scope=SharedScope.ATTENTION, lora=LoraConfig(rank=4))
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        FedProxConfig(mu=-1.0)
    algorithm = FedAvg()
    with pytest.raises(FedExpertsError, match="prepare"):
        algorithm.initial_global_state(tiny_model("olmoe"))
    model = prepared(algorithm)
    with pytest.raises(FedExpertsError, match="did not receive shared tensor"):
        algorithm.setup_client(model, Payload({}), None, LocalData(ClientInfo("a", 4)))

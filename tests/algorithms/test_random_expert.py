import copy

import torch

from fedexperts.algorithms import RandomExpert
from fedexperts.algorithms.random_expert.config import RandomExpertConfig
from fedexperts.config import TrainConfig
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData
from fedexperts.models import tiny_model
from fedexperts.moe import Role
from fedexperts.training import train_local
from tests.algorithms.helpers import batches_for


def client_round(algorithm, model, global_state, name, seed, personal=None, round_number=1):
    info = ClientInfo(name, 8)
    context = algorithm.setup_client(
        model, algorithm.downlink(global_state, info), personal, LocalData(info, round=round_number)
    )
    torch.manual_seed(seed)
    train_local(model, batches_for(model, seed), TrainConfig(steps_per_round=3, learning_rate=5e-2, weight_decay=0.1))
    return ClientUpdate(info, algorithm.uplink(context)), algorithm.personal_state(context)


def rows(algorithm, model):
    params = dict(model.named_parameters())
    return {f"{name}@expert={e}": params[name][e].detach().clone() for name, e in algorithm.chosen.items()}


def test_personal_rows_stay_on_the_client_and_lora_is_still_shared():
    model = tiny_model("olmoe")
    pristine = dict(copy.deepcopy(model).named_parameters())
    algorithm = RandomExpert(RandomExpertConfig(personal=True))
    algorithm.prepare(model)
    assert all(algorithm.roles[name] is Role.PERSONAL for name in algorithm.chosen)
    start = algorithm.initial_global_state(model)
    assert start and not any("@expert=" in key or "experts" in key for key in start)  # attention LoRA only
    pretrained = rows(algorithm, model)

    a1, a_state = client_round(algorithm, model, start, "a", seed=1)
    a_trained = rows(algorithm, model)
    b1, b_state = client_round(algorithm, model, start, "b", seed=2)
    for update in (a1, b1):
        assert set(update.payload.tensors) == set(start)  # the personal rows are never in the uplink
    assert set(a_state.tensors) == set(pretrained)
    for key, row in a_state.tensors.items():
        assert torch.equal(row, a_trained[key]) and not torch.equal(row, pretrained[key])
        assert not torch.equal(row, b_state.tensors[key])  # b started from the pretrained rows, not a's
    params = dict(model.named_parameters())
    for name, expert in algorithm.chosen.items():  # the other rows stay the frozen pretrained ones
        others = [row for row in range(params[name].shape[0]) if row != expert]
        assert torch.equal(params[name][others], pristine[name][others]), name

    global_state = algorithm.aggregate(start, [a1, b1])
    algorithm.setup_client(model, algorithm.downlink(global_state, a1.client), a_state, LocalData(a1.client, round=2))
    assert all(torch.equal(row, a_state.tensors[key]) for key, row in rows(algorithm, model).items())  # a's own
    lora = dict(model.named_parameters())
    assert all(torch.equal(lora[name], tensor) for name, tensor in global_state.items())  # the averaged LoRA
    algorithm.setup_client(model, algorithm.downlink(global_state, a1.client), None, LocalData(ClientInfo("c", 8)))
    assert all(torch.equal(row, pretrained[key]) for key, row in rows(algorithm, model).items())  # new: pretrained
    _, again = client_round(algorithm, model, global_state, "a", seed=1, personal=a_state, round_number=2)
    assert all(not torch.equal(again.tensors[key], a_state.tensors[key]) for key in a_state.tensors)
    assert set(b_state.tensors) == set(again.tensors)


def test_shared_rows_are_the_default():
    model = tiny_model("olmoe")
    algorithm = RandomExpert()
    algorithm.prepare(model)
    start = algorithm.initial_global_state(model)
    assert set(rows(algorithm, model)) <= set(start)
    _, personal = client_round(algorithm, model, start, "a", seed=1)
    assert personal is None


def test_personal_random_expert_end_to_end_keeps_rows_on_disk(micro_config):
    from fedexperts.federation.inprocess import run_experiment

    result = run_experiment(micro_config("algorithm.name=random-expert", "algorithm.personal=true"))
    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    assert result.records[0]["parameters"]["personal"] > 0
    assert sorted(path.stem for path in (result.run_dir / "clients").glob("*.safetensors"))

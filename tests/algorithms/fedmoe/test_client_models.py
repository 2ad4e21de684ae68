"""FedMoE clients that hold only their sub-MoE: loaded from the checkpoint, prepared like the base, trained in place."""

import pytest
import torch
import transformers

from fedexperts.algorithms.fedavg.config import FedAvgConfig
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.config import TrainConfig
from fedexperts.data.expertbench import ExpertBench
from fedexperts.errors import FedExpertsError
from fedexperts.federation.accounting import held_bytes
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models import load_meta, load_sub_moe, tiny_model
from fedexperts.models.builtin import RECIPES, build_tokenizer
from fedexperts.training import train_local
from tests.algorithms.fedmoe.common import fedmoe, per_layer
from tests.algorithms.helpers import batches_for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe")
    tiny_model("olmoe", seed=4).save_pretrained(path)
    build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"]).save_pretrained(path)  # a node loads it too
    return path


def prepared_on(folder, algorithm, dtype=torch.float32):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    algorithm.prepare(base)
    return base, algorithm.initial_global_state(base)


def trained_reply(algorithm, model, received, info):
    context = algorithm.setup_client(model, received, None, LocalData(info))
    torch.manual_seed(7)
    train_local(context.model, batches_for(context.model, 0), TrainConfig(steps_per_round=2, learning_rate=0.05))
    return context, algorithm.uplink(context)


def test_a_loaded_sub_moe_trains_in_place_and_replies_as_the_view_does(folder):
    algorithm = fedmoe(budget_fraction=1.0)
    base, state = prepared_on(folder, algorithm)
    structure = [[0, 3, 5], [1, 2], [2, 4, 6, 7]]
    algorithm.assign("c", structure)
    info = ClientInfo("c", 4)
    received = decode(encode(algorithm.downlink(state, info)))
    keep = algorithm.client_experts(received)
    assert keep == algorithm.layout.held(structure)
    loaded = load_sub_moe(folder, keep)
    algorithm.prepare_client_model(loaded)
    assert held_bytes(loaded) == pytest.approx(algorithm.memory(structure), rel=0.02)

    on_loaded, from_loaded = trained_reply(algorithm, loaded, received, info)
    on_view, from_view = trained_reply(algorithm, base, received, info)
    assert on_loaded.model is loaded and on_view.model is not base
    assert from_loaded.metadata == from_view.metadata
    assert from_loaded.tensors.keys() == from_view.tensors.keys()
    for name, tensor in from_view.tensors.items():
        assert torch.equal(from_loaded.tensors[name], tensor), name
    assert any(not torch.equal(from_view.tensors[name], state[name]) for name in algorithm.layout.rows)
    algorithm.check_update(from_loaded, state, info)


def test_a_bf16_sub_moe_trains_float32_rows_over_bf16_dense_weights(folder):
    algorithm = fedmoe(budget_fraction=1.0)
    _, state = prepared_on(folder, algorithm, torch.bfloat16)
    algorithm.assign("c", per_layer(0, 1, 2))
    received = decode(encode(algorithm.downlink(state, ClientInfo("c", 4))))
    loaded = load_sub_moe(folder, algorithm.client_experts(received), dtype="bfloat16")
    algorithm.prepare_client_model(loaded)
    context = algorithm.setup_client(loaded, received, None, LocalData(ClientInfo("c", 4)))
    params = dict(context.model.named_parameters())
    assert all(params[name].dtype == torch.float32 and params[name].requires_grad for name in algorithm.layout.rows)
    assert all(params[name].dtype == torch.float32 for name in algorithm.layout.dense)  # LoRA masters
    assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not params["model.embed_tokens.weight"].requires_grad
    dense = {name for name in params if name not in algorithm.layout.rows and name not in algorithm.layout.dense}
    assert not any(params[name].requires_grad for name in dense)


def test_profiling_names_every_expert_and_the_shared_base_is_never_trained_in_place(folder):
    algorithm = fedmoe(budget_fraction=1.0)
    base, state = prepared_on(folder, algorithm)
    received = decode(encode(algorithm.downlink(state, ClientInfo("full", 4))))
    assert algorithm.client_experts(received) == algorithm.layout.held(algorithm.layout.full)
    algorithm.assign("small", algorithm.layout.full)  # stage 2 with every expert, on the shared base
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    received = decode(encode(algorithm.downlink(state, ClientInfo("small", 4))))
    context, _ = trained_reply(algorithm, base, received, ClientInfo("small", 4))
    assert context.model is not base  # a view: the base's experts stay pretrained and frozen
    assert not any(base.get_parameter(name).requires_grad for name in algorithm.layout.rows)
    for name in algorithm.layout.rows:
        assert torch.equal(base.state_dict()[name], before[name]), name


def test_a_node_prepares_on_the_meta_device_with_the_real_layout_and_roles(folder):
    for dtype in ("float32", "bfloat16"):
        real = fedmoe(budget_fraction=0.7)
        prepared_on(folder, real, getattr(torch, dtype))
        meta = fedmoe(budget_fraction=0.7)
        skeleton = load_meta(folder, dtype=dtype).model
        meta.prepare(skeleton)
        assert meta.layout == real.layout and meta.roles == real.roles
        assert meta.full_bytes == real.full_bytes and meta.min_bytes == real.min_bytes
        assert held_bytes(skeleton) == 0


def test_client_models_must_have_the_bases_parameters():
    algorithm = build_algorithm(FedAvgConfig())
    other = tiny_model("qwen3_moe")
    with pytest.raises(FedExpertsError, match="prepare\\(model\\) must run before client models are built"):
        algorithm.prepare_client_model(other)
    algorithm.prepare(tiny_model("olmoe"))
    assert algorithm.client_experts(decode(encode(algorithm.downlink({}, ClientInfo("c", 1))))) is None
    with pytest.raises(FedExpertsError, match="the client model's parameters differ from the base's"):
        algorithm.prepare_client_model(other)

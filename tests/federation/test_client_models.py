"""Where a client step's model comes from: the shared base, or a sub-MoE loaded for that step only."""

import pytest
import torch
import transformers

from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.data.expertbench import ExpertBench
from fedexperts.errors import FedExpertsError
from fedexperts.experiment import ClientModels, build_setting
from fedexperts.federation.accounting import held_bytes
from fedexperts.federation.client import ClientTask, run_client
from fedexperts.federation.payload import decode, encode
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import ClientInfo
from fedexperts.models import load_meta, tiny_model
from fedexperts.models.builtin import RECIPES, build_tokenizer


def downlink(setting, client_id):
    algorithm = setting.algorithm
    info = ClientInfo(client_id, setting.client(client_id).num_examples if setting.clients else 4)
    return info, decode(encode(algorithm.downlink(algorithm.initial_global_state(setting.model), info)))


def test_a_flower_node_runs_fedmoe_without_ever_loading_the_full_model(micro_config, tmp_path, monkeypatch):
    config = micro_config(
        "algorithm.name=fedmoe", "algorithm.fedmoe.budget_fraction=0.8", "algorithm.fedmoe.wait_for_stage_1=false"
    )
    server = build_setting(config, only_clients=[0, 1], evaluation=False)
    monkeypatch.setattr("fedexperts.experiment.load_model", lambda *a, **k: pytest.fail("the node loaded the model"))
    node = build_setting(config, only_clients=[0], evaluation=False, node=True)
    assert held_bytes(node.model) == 0  # the node's base is the meta-device skeleton it prepared the algorithm on
    assert node.algorithm.layout == server.algorithm.layout and node.algorithm.roles == server.algorithm.roles
    info, received = downlink(server, "client-1")  # client-0 has the full budget and profiles; client-1 does not
    structure = server.algorithm.structure_of("client-1")
    assert structure is not None and structure != server.algorithm.layout.full
    model = node.client_model(received)
    assert held_bytes(model) == pytest.approx(server.algorithm.memory(structure), rel=0.02)

    info, received = downlink(server, "client-0")
    seen = []
    original = ClientModels.model_for

    def spy(self, *args):
        seen.append(original(self, *args))
        return seen[-1]

    monkeypatch.setattr(ClientModels, "model_for", spy)
    reply = run_client(node, ClientStateStore(tmp_path / "state"), ClientTask("client-0", 1), received)
    server.algorithm.check_update(reply, server.algorithm.initial_global_state(server.model), info)
    assert held_bytes(seen[0]) == held_bytes(server.model)  # profiling loads the whole model, for that step only


def test_budget_0_4_clients_hold_under_45_percent_of_the_full_model(tmp_path):
    folder = tmp_path / "olmoe"
    tiny_model("olmoe", num_experts=16, intermediate_size=32).save_pretrained(folder)
    build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"]).save_pretrained(folder)
    config = FedMoEConfig(fedmoe=FedMoEOptions(budget_fraction=0.4, full_budget_every=0))
    server, node = build_algorithm(config, client_ids=["c"]), build_algorithm(config, client_ids=["c"])
    full = transformers.AutoModelForCausalLM.from_pretrained(folder)
    server.prepare(full)
    node.prepare(load_meta(folder).model)
    received = decode(encode(server.downlink(server.initial_global_state(full), ClientInfo("c", 4))))
    model = ClientModels(folder).model_for(node, torch.nn.Module(), received)
    assert held_bytes(model) <= 0.45 * held_bytes(full)
    assert held_bytes(model) == pytest.approx(server.memory(server.structure_of("c")), rel=0.02)


def test_sub_moe_clients_need_a_local_checkpoint(micro_config):
    config = micro_config("algorithm.name=fedmoe", "federation.client_model=sub-moe", 'model.name="org/some-hub-model"')
    with pytest.raises(FedExpertsError, match="model must be builtin or a local folder"):
        build_setting(config, only_clients=[], evaluation=False)


def test_other_algorithms_always_share_the_base(micro_config):
    setting = build_setting(micro_config("federation.client_model=sub-moe"), only_clients=[0], evaluation=False)
    assert setting.client_models.folder is None
    _, received = downlink(setting, "client-0")
    assert setting.client_model(received) is setting.model

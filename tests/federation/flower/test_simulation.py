"""The same config and seed on the in-process runtime and on Flower's simulation engine (Ray)."""

import pytest
from safetensors.torch import load_file

from fedexperts.federation.flower import run_simulation
from fedexperts.federation.inprocess import run_experiment

TOLERANCE = 1e-5
"""Both runtimes run the same seeded client step; only float summation order could differ (thread counts)."""


def per_client(records):
    """Per round (and final), per client: the scores and training loss that must agree across runtimes."""
    table = {}
    for record in records:
        if record["kind"] == "round":
            for client, entry in record["clients"].items():
                table[(record["round"], client)] = (entry["status"], entry["eval"], entry["train_loss"])
        elif record["kind"] == "final":
            for client, entry in record["clients"].items():
                table[("final", client)] = (entry["status"], entry["own"], entry["union"], entry["probes"])
    return table


def assert_close(left, right, where):
    if isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_close(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, tuple | list):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_close(a, b, f"{where}[{index}]")
    elif isinstance(left, float):
        assert right == pytest.approx(left, abs=TOLERANCE), where
    else:
        assert left == right, where


def assert_same_runs(local, flower, tmp_path):
    """The same per-client scores and losses, the same final global checkpoint; bytes on both wires."""
    expected, got = per_client(local.records), per_client(flower.records)
    assert expected.keys() == got.keys()
    assert all(entry[0] == "ok" for entry in got.values())
    for key in expected:
        assert_close(expected[key], got[key], str(key))
    in_process = load_file(sorted((tmp_path / "inprocess" / "checkpoints").glob("*.safetensors"))[-1])
    on_flower = load_file(sorted((tmp_path / "flower" / "checkpoints").glob("*.safetensors"))[-1])
    assert in_process.keys() == on_flower.keys()
    for name, tensor in in_process.items():
        assert (on_flower[name] - tensor).abs().max() <= TOLERANCE, name
    # bytes are counted on each wire as it is: safetensors in-process, Flower records on Flower
    for record in flower.records:
        if record["kind"] == "round":
            assert all(entry["bytes_down"] > 0 and entry["bytes_up"] > 0 for entry in record["clients"].values())


@pytest.mark.parametrize("algorithm", ["fedavg", "flex", "fedmoe", "ffa-lora", "feddpa"])
def test_flower_simulation_gives_the_in_process_results(micro_config, tmp_path, algorithm):
    config = micro_config(f"algorithm.name={algorithm}", "federation.clients=2", "federation.min_clients=2")
    local = run_experiment(config, tmp_path / "inprocess")
    flower = run_simulation(config, tmp_path / "flower")
    assert_same_runs(local, flower, tmp_path)
    if algorithm in ("flex", "feddpa"):  # personal experts and gates, local adapters: on each node's disk
        for client in ("client-0", "client-1"):
            kept = load_file(tmp_path / "inprocess" / "clients" / f"{client}.safetensors")
            [node_file] = (tmp_path / "flower" / "nodes").glob(f"run-*/partition-{client[-1]}/{client}.safetensors")
            on_node = load_file(node_file)
            assert kept.keys() == on_node.keys() and kept
            for name, tensor in kept.items():
                assert (on_node[name] - tensor).abs().max() <= TOLERANCE, name


def test_flower_simulation_of_fedmoe_on_switch_gives_the_in_process_results(switch_model_path, micro_config, tmp_path):
    """An encoder-decoder on Flower: each node prepares FedMoE on the meta Switch and its clients load their
    sub-MoEs from the checkpoint (per-expert modules by global index); in-process clients train views."""
    config = micro_config(
        f'model.name="{switch_model_path}"',
        "algorithm.name=fedmoe",
        "algorithm.fedmoe.warmup_rounds=0",
        "algorithm.fedmoe.budget_fraction=0.95",  # client-0 profiles the full model, client-1 trains a sub-MoE
        "federation.clients=2",
        "federation.min_clients=2",
        "train.steps_per_round=1",
        "train.batch_size=2",
        "data.items=40",
        "eval.union_examples=0",
        "eval.probes=0",
        "eval.max_examples=1",
        "eval.max_new_tokens=2",
    )
    local = run_experiment(config, tmp_path / "inprocess")
    flower = run_simulation(config, tmp_path / "flower")
    assert_same_runs(local, flower, tmp_path)  # measured: the checkpoints differ by at most 1.0e-6
    last = [record for record in flower.records if record["kind"] == "round"][-1]
    sizes = sorted(entry["bytes_down"] for entry in last["clients"].values())
    assert sizes[0] < sizes[-1]  # a sub-MoE went to the budget client

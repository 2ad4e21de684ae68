"""FedMoE and randomMoE through the in-process runtime on the micro model, and a resume mid-round."""

import json

import pytest
import torch
from safetensors import safe_open

from fedexperts import experiment
from fedexperts.errors import FedExpertsError
from fedexperts.federation import client as client_module
from fedexperts.federation import inprocess
from fedexperts.federation.inprocess import run_experiment
from tests.algorithms.fedmoe.common import fedmoe


def test_a_too_small_budget_stops_the_run_naming_the_client(micro_config):
    with pytest.raises(FedExpertsError, match=r"memory budget of client-0 \(algorithm.fedmoe.budgets\[0\] = 1 bytes"):
        run_experiment(micro_config("algorithm.name=fedmoe", "algorithm.fedmoe.budgets=[1, 1, 1]"))


@pytest.fixture
def micro_budgets(micro_model_path):
    """Budgets for the micro run's three clients: one profiles, two hold sub-MoEs."""
    from fedexperts.models.load import load_model

    probe = fedmoe(budget_fraction=1.0)
    probe.prepare(load_model(micro_model_path).model)
    middle = (probe.full_bytes + probe.min_bytes) // 2
    return f"algorithm.fedmoe.budgets=[{probe.full_bytes}, {middle}, {probe.min_bytes}]"


def checkpoint(run_dir):
    path = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in sorted(handle.keys())}, handle.metadata()


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in {"seconds", "peak_memory_bytes", "bytes_up"}}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


CHEAP_FINAL = ("eval.union_examples=0", "eval.probes=0")


class Interrupt(BaseException):
    pass


def test_fedmoe_end_to_end_and_resumed_mid_round(micro_config, micro_budgets, monkeypatch):
    overrides = ("algorithm.name=fedmoe", micro_budgets, "algorithm.fedmoe.patience=1", *CHEAP_FINAL)
    reference = run_experiment(micro_config(*overrides, "name=reference"))
    _, first, second, final = reference.records
    assert all(entry["status"] == "ok" for record in (first, second) for entry in record["clients"].values())
    profile, mid, small = (first["clients"][f"client-{i}"]["bytes_down"] for i in range(3))
    assert profile < small < mid  # round 1: the full-budget client gets the dense part only
    assert second["clients"]["client-0"]["bytes_down"] > mid  # then its whole model
    assert all(scores["own"] is not None for scores in final["clients"].values())
    tensors, metadata = checkpoint(reference.run_dir)
    clients = json.loads(metadata["fedexperts"])["server"]["clients"]
    assert clients["client-0"]["source"] == "measured" and "server/activation/client-0/0" in tensors
    assert all(torch.isfinite(t).all() for t in tensors.values())

    config = micro_config(*overrides, "name=interrupted")
    real, calls = client_module.run_client, []

    def dies_in_round_two(setting, store, task, received):
        if task.round == 2 and len([c for c in calls if c.round == 2]) == 2:
            raise Interrupt
        calls.append(task)
        return real(setting, store, task, received)

    monkeypatch.setattr(inprocess, "run_client", dies_in_round_two)
    with pytest.raises(Interrupt):
        run_experiment(config)
    monkeypatch.setattr(inprocess, "run_client", real)
    resumed = run_experiment(config, resume=True)
    assert stable(resumed.records[1:]) == stable(reference.records[1:])
    (a, meta_a), (b, meta_b) = checkpoint(reference.run_dir), checkpoint(resumed.run_dir)
    assert a.keys() == b.keys() and meta_a == meta_b
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_random_moe_end_to_end(micro_config, micro_budgets):
    result = run_experiment(micro_config("algorithm.name=random-moe", micro_budgets, "eval.every=0", *CHEAP_FINAL))
    kinds = [line["kind"] for line in result.records]
    assert kinds == ["run", "round", "round", "final"]
    for record in result.records[1:3]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())


def test_clients_that_load_only_their_sub_moe_give_the_shared_runs_results(micro_config, micro_budgets, monkeypatch):
    """The same client steps on the same numbers: a loaded sub-MoE holds the view's tensors, bit for bit."""
    overrides = ("algorithm.name=fedmoe", micro_budgets, "algorithm.fedmoe.patience=1", *CHEAP_FINAL)
    shared = run_experiment(micro_config(*overrides, "name=shared"))
    kept = []
    original = experiment.load_sub_moe

    def counted(folder, keep, **options):
        kept.append(sum(len(experts) for experts in keep.values()))
        return original(folder, keep, **options)

    monkeypatch.setattr(experiment, "load_sub_moe", counted)
    loaded = run_experiment(micro_config(*overrides, "name=sub-moe", "federation.client_model=sub-moe"))
    assert len(kept) == 3 * 3 and min(kept) < max(kept)  # every step of 3 clients x (2 rounds + final) loaded its own
    assert stable(loaded.records[1:]) == stable(shared.records[1:])
    (a, meta_a), (b, meta_b) = checkpoint(shared.run_dir), checkpoint(loaded.run_dir)
    assert a.keys() == b.keys() and meta_a == meta_b
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

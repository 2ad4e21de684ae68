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
    overrides = (
        "algorithm.name=fedmoe",
        micro_budgets,
        "algorithm.fedmoe.patience=1",
        "algorithm.fedmoe.warmup_rounds=0",
        "federation.rounds=3",
        *CHEAP_FINAL,
    )
    reference = run_experiment(micro_config(*overrides, "name=reference"))
    _, first, second, third, final = reference.records
    records = (first, second, third)
    assert all(entry["status"] == "ok" for record in records for entry in record["clients"].values())
    profile, waiting, _ = (first["clients"][f"client-{i}"]["bytes_down"] for i in range(3))
    # round 1 is stage 1: the full-budget client measures on the full MoE (dense part sent), the others wait
    assert waiting < 1000 < profile
    assert all(first["clients"][f"client-{i}"].get("train_loss") is None for i in (1, 2))
    full, mid, small = (second["clients"][f"client-{i}"]["bytes_down"] for i in range(3))
    assert profile < small < mid < full  # stage 2: every client its sub-MoE, the measured one the whole model
    # stage 2's bytes as the paper counts them (the whole sub-MoE in float32), recorded beside those sent
    reports = [third["clients"][f"client-{i}"]["report"] for i in range(3)]
    assert reports[0]["paper_bytes"] > reports[1]["paper_bytes"] > reports[2]["paper_bytes"]
    assert reports[0]["experts"] > reports[1]["experts"] > reports[2]["experts"]
    # every training client scored its validation rows, what the recommendation reads
    assert all(third["clients"][f"client-{i}"]["validation"]["examples"] > 0 for i in range(3))
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


def test_fedmoe_weighs_experts_by_routed_tokens_end_to_end(micro_config, micro_budgets):
    """Loaded sub-MoEs count their held experts' tokens in training; the server accepts and averages by them."""
    overrides = (
        "algorithm.name=fedmoe",
        micro_budgets,
        "algorithm.fedmoe.warmup_rounds=0",
        "algorithm.expert_weighting=tokens",
        "federation.client_model=sub-moe",
        "eval.every=0",
        *CHEAP_FINAL,
    )
    result = run_experiment(micro_config(*overrides))
    _, first, second, _final = result.records
    assert all(entry["status"] == "ok" for record in (first, second) for entry in record["clients"].values())
    assert all(second["clients"][f"client-{i}"]["train_loss"] is not None for i in (1, 2))  # sub-MoEs sent rows
    tensors, _ = checkpoint(result.run_dir)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_no_structure_decision_reads_a_test_row(micro_config, micro_budgets, monkeypatch):
    """Test rows poisoned (references replaced, tokens reversed): the test scores change, no structure does."""
    from dataclasses import replace

    from fedexperts import experiment

    overrides = (
        "algorithm.name=fedmoe",
        micro_budgets,
        "algorithm.fedmoe.patience=1",
        "algorithm.fedmoe.warmup_rounds=0",
        "federation.rounds=4",
        *CHEAP_FINAL,
    )
    clean = run_experiment(micro_config(*overrides, "name=clean"))
    real = experiment.with_clients

    def poisoned(setting, wanted, rows):
        built = real(setting, wanted, rows)
        bad = []
        for client in built.clients:
            rows = tuple({"input_ids": row["input_ids"][::-1], "labels": row["labels"]} for row in client.test.rows)
            test = replace(client.test, references=("zebra quartz",) * len(client.test), rows=rows)
            bad.append(replace(client, test=test))
        return replace(built, clients=tuple(bad))

    real_scores, noise = (
        client_module.instruction_scores,
        iter(torch.rand(1000, generator=torch.Generator().manual_seed(0))),
    )

    def scores(model, tokenizer, data, **options):  # poisoned rows score at random (the micro model scores 0)
        measured = real_scores(model, tokenizer, data, **options)
        if data.references and data.references[0] == "zebra quartz":
            return measured.model_copy(update={"rouge_l": float(next(noise))})
        return measured

    monkeypatch.setattr(experiment, "with_clients", poisoned)
    monkeypatch.setattr(client_module, "instruction_scores", scores)
    dirty = run_experiment(micro_config(*overrides, "name=poisoned"))

    def structures(result):
        _tensors, metadata = checkpoint(result.run_dir)
        clients = json.loads(metadata["fedexperts"])["server"]["clients"]
        return {cid: (record["structure"], record["recommendation"]) for cid, record in clients.items()}

    def test_scores(result):
        return [e["eval"]["rouge_l"] for r in result.records[1:-1] for e in r["clients"].values() if e.get("eval")]

    assert test_scores(clean) != test_scores(dirty)
    assert structures(clean) == structures(dirty)
    validation = [[e.get("validation") for e in r["clients"].values()] for r in clean.records[1:-1]]
    assert validation == [[e.get("validation") for e in r["clients"].values()] for r in dirty.records[1:-1]]


def test_clients_that_load_only_their_sub_moe_give_the_shared_runs_results(micro_config, micro_budgets, monkeypatch):
    """The same client steps on the same numbers: a loaded sub-MoE holds the view's tensors, bit for bit."""
    overrides = (
        "algorithm.name=fedmoe",
        micro_budgets,
        "algorithm.fedmoe.patience=1",
        "algorithm.fedmoe.warmup_rounds=0",
        *CHEAP_FINAL,
    )
    shared = run_experiment(micro_config(*overrides, "name=shared"))
    kept = []
    original = experiment.load_sub_moe

    def counted(folder, keep, **options):
        kept.append(sum(len(experts) for experts in keep.values()))
        return original(folder, keep, **options)

    monkeypatch.setattr(experiment, "load_sub_moe", counted)
    loaded = run_experiment(micro_config(*overrides, "name=sub-moe", "federation.client_model=sub-moe"))
    # round 1: the profiling client loads the full model, the others wait (no model); then 3 steps in round 2 and final
    assert len(kept) == 1 + 3 + 3 and min(kept) < max(kept)
    assert stable(loaded.records[1:]) == stable(shared.records[1:])
    (a, meta_a), (b, meta_b) = checkpoint(shared.run_dir), checkpoint(loaded.run_dir)
    assert a.keys() == b.keys() and meta_a == meta_b
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_fedmoe_rounds_on_a_hybrid_model_train_held_rows_and_mamba_lora():
    """Jamba (Mamba and attention layers): a profiling client and a sub-MoE client train, the server merges."""
    from fedexperts.algorithms.fedmoe.algorithm import HELD_KEY
    from fedexperts.federation.payload import decode, encode
    from fedexperts.interface import ClientInfo, ClientUpdate, LocalData
    from fedexperts.models import tiny_model
    from tests.algorithms.fedmoe.common import fedmoe
    from tests.algorithms.helpers import batches_for, train_phases

    probe = fedmoe(budget_fraction=1.0)
    probe.prepare(tiny_model("jamba"))
    algorithm = fedmoe({"big": probe.full_bytes, "small": probe.min_bytes + 2 * probe.layout.expert_bytes[0]})
    model = tiny_model("jamba")
    algorithm.prepare(model)
    state = algorithm.initial_global_state(model)
    assert any(".mamba." in name for name in algorithm.layout.dense)
    updates = []
    for round_number, client in enumerate(("big", "small"), start=1):
        info = ClientInfo(client, 4)
        received = decode(encode(algorithm.downlink(state, info)))
        batches = batches_for(model, round_number)
        data = LocalData(info, lambda batches=batches: iter(batches), round_number)
        context = algorithm.setup_client(model, received, None, data)
        train_phases(algorithm, context, batches, steps=2)
        reply = decode(encode(algorithm.uplink(context)))
        algorithm.check_update(reply, state, info)
        updates.append(ClientUpdate(info, reply))
    held = updates[1].payload.metadata[HELD_KEY]
    assert 0 < sum(len(experts) for experts in held.values()) < 16  # the small client held a sub-MoE
    merged = algorithm.aggregate(state, updates[1:])
    for name, layer in algorithm.layout.rows.items():
        kept = held[algorithm.layout.layer_names[layer]]
        changed = [row for row in range(8) if not torch.equal(merged[name][row], state[name][row])]
        assert set(changed) <= set(kept), name
    mamba = [name for name in algorithm.layout.dense if ".mamba." in name and "lora_B" in name]
    assert any(not torch.equal(merged[name], state[name]) for name in mamba)

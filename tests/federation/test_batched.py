"""Batched clients (``federation.parallel_clients``) give what the clients give one after another, for every algorithm.

Tolerance: float32 on CPU, the batched matmuls run at other shapes than one client's, so results
differ by rounding; after two rounds of AdamW steps, tensors agree within ``atol=2e-4`` (the
learning rate is 1e-2: a coordinate whose near-zero gradient changes sign moves by at most one step
of ``lr``, which the relative bound of the largest coordinates absorbs), losses within 1e-4.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from fedexperts.algorithms.registry import algorithm_names
from fedexperts.batching import train_batched
from fedexperts.federation import batched
from fedexperts.federation.inprocess import run_experiment
from tests.federation.helpers import final_state

SEQUENTIAL_ONLY = {"dense", "feddpa", "fedmoe", "random-moe", "random-expert"}
"""Algorithms that say why they cannot batch (:attr:`~fedexperts.interface.Algorithm.batching_refusal`)."""
CASES = {
    **{name: (f"algorithm.name={name}",) for name in algorithm_names() if name not in SEQUENTIAL_ONLY},
    "fedprox": ("algorithm.name=fedprox", "algorithm.mu=0.1"),
    "fedavg-lora-dropout": ("algorithm.name=fedavg", "algorithm.lora.dropout=0.1"),
    "fedavg-non-expert": ("algorithm.name=fedavg", 'algorithm.scope="non-expert"'),
    "fedavg-fedadam": ("algorithm.name=fedavg", "algorithm.server.rule=fedadam", "algorithm.server.lr=0.01"),
    "flex-top2-aux-loss": ("algorithm.name=flex", "algorithm.flex.top_n=2", "train.router_aux_loss_coef=0.01"),
}
"""Every algorithm that batches, and the paths batching takes apart: dropout streams, grouped non-Linear units
(embeddings, norms, routers), server rules, top-n grafts with the load-balancing loss."""


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _personal(run_dir):
    states = {}
    for path in sorted((run_dir / "clients").rglob("*.safetensors")):
        states.update({f"{path.parent.name}/{key}": value for key, value in load_file(path).items()})
    return states


def _assert_close_states(left, right):
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-3, atol=2e-4, msg=key)


def _scores(records):
    """Every score the run recorded (per-round and final evaluations), by record, client and split."""
    found = {}
    for index, record in enumerate(records):
        clients = record.get("clients")
        for client, entry in sorted(clients.items() if isinstance(clients, dict) else ()):
            for split in ("eval", "val", "union"):
                for key, value in (entry.get(split) or {}).items():
                    found[(index, client, split, key)] = value
    return found


def _train_losses(records):
    return [
        (record["round"], client, entry["train_loss"])
        for record in records
        if record["kind"] == "round"
        for client, entry in sorted(record["clients"].items())
        if "train_loss" in entry
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_clients_equal_sequential_clients(micro_config, tmp_path, monkeypatch, case):
    batch_sizes = []

    def counted(model, members, *args, **kwargs):
        batch_sizes.append(len(members))
        return train_batched(model, members, *args, **kwargs)

    monkeypatch.setattr(batched, "train_batched", counted)
    runs = {}
    for parallel in (1, 3):
        config = micro_config(*CASES[case], "eval.every=1", f"federation.parallel_clients={parallel}")
        runs[parallel] = run_experiment(config, tmp_path / f"k{parallel}").run_dir
    assert batch_sizes == [3, 3]  # both rounds' three clients trained as one batch
    _assert_close_states(final_state(runs[1]), final_state(runs[3]))
    _assert_close_states(_personal(runs[1]), _personal(runs[3]))
    sequential, together = _records(runs[1]), _records(runs[3])
    for (round_a, client_a, loss_a), (round_b, client_b, loss_b) in zip(
        _train_losses(sequential), _train_losses(together), strict=True
    ):
        assert (round_a, client_a) == (round_b, client_b)
        assert loss_a == pytest.approx(loss_b, abs=1e-4)
    assert len(_train_losses(together)) == 6  # 3 clients x 2 rounds trained
    scores = _scores(sequential)
    assert scores and scores.keys() == _scores(together).keys()
    assert _scores(together) == pytest.approx(scores, abs=1e-3)


@pytest.mark.parametrize("name", sorted(SEQUENTIAL_ONLY & set(algorithm_names())))
def test_an_algorithm_that_cannot_batch_says_why_and_runs_sequentially(micro_config, tmp_path, name, caplog):
    from fedexperts.experiment import build_setting

    config = micro_config(f"algorithm.name={name}", "federation.parallel_clients=3")
    setting = build_setting(config)
    assert setting.algorithm.batching_refusal
    with caplog.at_level(logging.WARNING, logger="fedexperts.federation.inprocess"):
        from fedexperts.federation.inprocess import InProcessTransport
        from fedexperts.federation.state import ClientStateStore

        transport = InProcessTransport(setting, ClientStateStore(tmp_path / "clients"))
    assert transport.parallel == 1
    assert "one at a time" in caplog.text and setting.algorithm.batching_refusal in caplog.text


def test_a_client_that_fails_in_a_batch_is_recorded_and_the_others_train(micro_config, tmp_path, monkeypatch):
    begin = batched.begin_client

    def failing(setting, store, task, received):
        if task.client_id == "client-1" and task.train:
            raise RuntimeError("disk gone")
        return begin(setting, store, task, received)

    monkeypatch.setattr(batched, "begin_client", failing)
    config = micro_config("federation.parallel_clients=3", "federation.rounds=1")
    records = _records(run_experiment(config, tmp_path / "run").run_dir)
    (round_record,) = [record for record in records if record["kind"] == "round"]
    clients = round_record["clients"]
    assert "disk gone" in clients["client-1"]["error"]
    assert all("train_loss" in clients[name] for name in clients if name != "client-1")

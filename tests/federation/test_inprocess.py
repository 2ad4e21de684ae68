import json

import pytest
import torch

from fedexperts.algorithms import FedAvg
from fedexperts.errors import FedExpertsError
from fedexperts.experiment import build_setting
from fedexperts.federation import client as client_module
from fedexperts.federation import inprocess
from fedexperts.federation.inprocess import run_experiment
from fedexperts.federation.payload import encode
from fedexperts.federation.server import RunError, _eval_record, sample_clients
from fedexperts.interface import Payload
from fedexperts.reporting.schema import Scores
from tests.federation.helpers import Interrupt, final_state, stable


def test_sampling_is_seeded_per_round_and_respects_the_minimum():
    ids = [f"c{i}" for i in range(10)]
    first = sample_clients(ids, fraction=0.3, minimum=1, seed=0, round_number=1)
    assert len(first) == 3 and first == sample_clients(ids, fraction=0.3, minimum=1, seed=0, round_number=1)
    assert len(sample_clients(ids, fraction=0.1, minimum=4, seed=0, round_number=1)) == 4
    rounds = {tuple(sample_clients(ids, fraction=0.3, minimum=1, seed=0, round_number=r)) for r in range(1, 6)}
    assert len(rounds) > 1


def test_enforced_different_sampling_takes_one_client_per_category_first():
    ids = [f"c{i}" for i in range(6)]
    groups = ["a", "a", "a", "b", "b", "c"]
    for round_number in range(1, 8):
        chosen = sample_clients(ids, fraction=0.5, minimum=1, seed=0, round_number=round_number, groups=groups)
        assert sorted(groups[ids.index(c)] for c in chosen) == ["a", "b", "c"]
    five = sample_clients(ids, fraction=0.8, minimum=1, seed=0, round_number=1, groups=groups)
    assert len(five) == 5 and {groups[ids.index(c)] for c in five} == {"a", "b", "c"}


def test_the_server_copies_every_scores_field_a_reply_carries():
    full = Scores(loss=1.0, exact_match=0.5, rouge_l=0.25, examples=2, rouge_1=0.5, rouge_2=0.0, token_f1=0.75)
    metadata = {**{f"eval_{key}": value for key, value in full.as_dict().items()}, "union_loss": 2.0, "examples": 9}
    assert _eval_record(metadata, "eval") == full.as_dict()  # accuracy was not sent: absent, not null
    assert _eval_record(metadata, "union") == {"loss": 2.0}
    assert _eval_record({"examples": 9}, "eval") is None


@pytest.mark.parametrize(
    "overrides",
    [
        ("algorithm.name=local",),
        ("algorithm.name=fedavg",),
        ("algorithm.name=fedprox", "algorithm.mu=0.1"),
        ("algorithm.name=fedavg", "algorithm.server.rule=fedavgm", "algorithm.server.lr=0.5"),
        ("algorithm.name=fedavg", "algorithm.server.rule=fedadam", "algorithm.server.lr=0.01"),
        ("algorithm.name=fedavg", "algorithm.server.rule=fedyogi", "algorithm.server.lr=0.01"),
        ("algorithm.name=fedavg", 'algorithm.scope="non-expert"'),
        ("algorithm.name=dense",),
        ("algorithm.name=dense", "algorithm.expert_weighting=tokens"),
    ],
    ids=lambda overrides: "-".join(part.split("=")[1].strip('"') for part in overrides),
)
def test_two_rounds_of_each_baseline_end_to_end(micro_config, overrides):
    config = micro_config(*overrides)
    result = run_experiment(config)
    kinds = [line["kind"] for line in result.records]
    assert kinds == ["run", "round", "round", "final"]
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.records
    run, *rounds, final = result.records
    assert run["parameters"]["trainable"] > 0
    for record in rounds:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())
        assert record["bytes_down"] == sum(e["bytes_down"] for e in record["clients"].values())
    for scores in final["clients"].values():
        assert scores["own"]["examples"] == 3 and scores["union"]["examples"] == 4
        assert list(scores["own"]) == list(scores["union"]) == list(Scores.model_fields)  # every score recorded
        assert 0.0 <= scores["probes"] <= 1.0
    state = final_state(result.run_dir)
    if config.algorithm.name == "local":
        assert not [key for key in state if key.startswith("global/")]
        assert all(e["bytes_up"] < 1000 for r in rounds for e in r["clients"].values())  # metrics only
        assert len(list((result.run_dir / "clients").glob("*.safetensors"))) == 3
    else:
        assert all(torch.isfinite(t).all() for t in state.values())
        assert not list((result.run_dir / "clients").glob("*.safetensors"))


def test_bytes_are_the_encoded_size_of_what_the_algorithm_sends(micro_config):
    config = micro_config("federation.rounds=1", "eval.every=0")
    setting = build_setting(config)
    start = setting.algorithm.initial_global_state(setting.model)
    result = run_experiment(config, setting=setting)
    round_record = result.records[1]
    expected = len(encode(Payload(start)))
    tensor_bytes = sum(t.numel() * t.element_size() for t in start.values())
    for entry in round_record["clients"].values():
        assert entry["bytes_down"] == expected
        assert tensor_bytes < entry["bytes_down"] < tensor_bytes + 200 * len(start) + 64
        assert entry["bytes_up"] > tensor_bytes


def test_fedprox_with_mu_zero_is_fedavg(micro_config):
    fedavg = run_experiment(micro_config("algorithm.name=fedavg", "name=a"))
    prox = run_experiment(micro_config("algorithm.name=fedprox", "algorithm.mu=0.0", "name=b"))
    a, b = final_state(fedavg.run_dir), final_state(prox.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert stable(fedavg.records[1:]) == stable(prox.records[1:])
    assert fedavg.records[1]["bytes_down"] == prox.records[1]["bytes_down"]


@pytest.mark.parametrize("where", ["between-rounds", "mid-round"])
def test_resume_ends_where_an_uninterrupted_run_ends(micro_config, monkeypatch, where):
    overrides = ("algorithm.name=fedavg", "algorithm.server.rule=fedavgm", "federation.rounds=3")
    reference = run_experiment(micro_config(*overrides, "name=reference"))

    config = micro_config(*overrides, "name=interrupted")
    if where == "between-rounds":

        def stop_after_two(record):
            if record["round"] == 2:
                raise Interrupt

        with pytest.raises(Interrupt):
            run_experiment(config, on_round=stop_after_two)
    else:
        real = client_module.run_client
        calls = []

        def dies_in_round_two(setting, store, task, received):
            if task.round == 2 and len([c for c in calls if c.round == 2]) == 2:
                raise Interrupt  # two clients of round 2 already trained and staged their state
            calls.append(task)
            return real(setting, store, task, received)

        monkeypatch.setattr(inprocess, "run_client", dies_in_round_two)
        with pytest.raises(Interrupt):
            run_experiment(config)
        monkeypatch.setattr(inprocess, "run_client", real)
    assert not (config.output_dir / "interrupted" / "records" / "final.json").exists()

    resumed = run_experiment(config, resume=True)
    assert stable(resumed.records[1:]) == stable(reference.records[1:])
    a, b = final_state(reference.run_dir), final_state(resumed.run_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not (resumed.run_dir / "clients" / ".staging").exists() or not any(
        (resumed.run_dir / "clients" / ".staging").iterdir()
    )


def test_a_failing_client_is_recorded_and_the_round_completes(micro_config, monkeypatch):
    real = client_module.run_client

    def flaky(setting, store, task, received):
        if task.client_id == "client-1" and task.train:
            raise RuntimeError("disk full")
        return real(setting, store, task, received)

    monkeypatch.setattr(inprocess, "run_client", flaky)
    result = run_experiment(micro_config())
    for record in result.records[1:3]:
        assert record["clients"]["client-1"]["status"] == "failed"
        assert "disk full" in record["clients"]["client-1"]["error"]
        assert record["clients"]["client-0"]["status"] == "ok"
    assert result.records[-1]["kind"] == "final"


def test_too_few_successful_clients_fail_the_run_and_keep_the_last_checkpoint(micro_config, monkeypatch):
    real = client_module.run_client

    def broken_in_round_two(setting, store, task, received):
        if task.round == 2 and task.client_id != "client-0":
            raise RuntimeError("boom\n" * 500)  # a long, multi-line reason
        return real(setting, store, task, received)

    monkeypatch.setattr(inprocess, "run_client", broken_in_round_two)
    config = micro_config("federation.min_clients=3", "federation.min_successful=2")
    with pytest.raises(RunError, match=r"round 2: 1 of 3 clients succeeded.*min_successful=2") as failure:
        run_experiment(config)
    message = str(failure.value)
    assert "\n" not in message and len(message) < 600  # each reason clipped to one short line
    assert "client-1: " in message and "client-2: " in message and "boom boom" in message and "…" in message
    run_dir = config.output_dir / config.name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-000001.safetensors"]


def test_nan_and_misshapen_updates_are_rejected_not_averaged(micro_config, monkeypatch):
    poisoned = {"client-1": float("nan"), "client-2": "shape"}
    real_uplink = FedAvg.uplink

    def uplink(self, context):
        payload = real_uplink(self, context)
        how = poisoned.get(context.client.client_id)
        if how is None:
            return payload
        name = next(iter(payload.tensors))
        tensors = dict(payload.tensors)
        tensors[name] = tensors[name].fill_(how) if how != "shape" else torch.zeros(3)
        return Payload(tensors, payload.metadata)

    monkeypatch.setattr(FedAvg, "uplink", uplink)
    config = micro_config("federation.rounds=1")
    setting = build_setting(config)
    start = setting.algorithm.initial_global_state(setting.model)
    result = run_experiment(config, setting=setting)
    clients = result.records[1]["clients"]
    assert clients["client-1"]["status"] == "rejected" and "NaN" in clients["client-1"]["error"]
    assert clients["client-2"]["status"] == "rejected" and "shape" in clients["client-2"]["error"]
    state = final_state(result.run_dir)
    assert all(torch.isfinite(t).all() for t in state.values())
    changed = [k for k in start if not torch.equal(start[k], state[f"global/{k}"])]
    assert changed  # client-0's update alone was applied


def test_an_existing_run_is_not_clobbered(micro_config):
    config = micro_config("federation.rounds=1", "eval.every=0")
    run_experiment(config)
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        run_experiment(config)
    other = micro_config("federation.rounds=1", "eval.every=0", "train.learning_rate=0.5")
    with pytest.raises(RunError, match=r"different config.*train.learning_rate"):
        run_experiment(other, resume=True)
    with pytest.raises(FedExpertsError, match="nothing to resume"):
        run_experiment(micro_config("name=never"), resume=True)

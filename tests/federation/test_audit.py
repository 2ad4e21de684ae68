"""``federation.audit``: every accepted update and each round's aggregate, kept so anyone can recompute it."""

import json

import torch
from safetensors.torch import load_file

from fedexperts.federation import client as client_module
from fedexperts.federation import inprocess
from fedexperts.federation.inprocess import run_experiment
from tests.federation.helpers import accepted, audited_round, weighted_mean


def test_each_round_s_aggregate_is_the_weighted_mean_of_exactly_the_audited_accepted_updates(micro_config, monkeypatch):
    real = client_module.run_client

    def flaky(setting, store, task, received):
        if task.client_id == "client-1" and task.round == 2 and task.train:
            raise RuntimeError("disk full")
        return real(setting, store, task, received)

    monkeypatch.setattr(inprocess, "run_client", flaky)
    config = micro_config("algorithm.name=fedavg", "federation.audit=true", "federation.min_clients=3")
    result = run_experiment(config)
    rounds = [record for record in result.records if record["kind"] == "round"]
    assert accepted(rounds[1]) == {"client-0", "client-2"}  # client-1 failed in round 2
    initial = load_file(result.run_dir / "audit" / "round-000001" / "initial.safetensors")
    for record in rounds:
        updates, global_state = audited_round(result.run_dir, record["round"])
        assert set(updates) == accepted(record)
        assert {client: weight for client, (_t, weight) in updates.items()} == {
            client: record["clients"][client]["examples"] for client in updates
        }
        recomputed = weighted_mean(updates)
        assert recomputed.keys() == global_state.keys() == initial.keys()
        for key, value in recomputed.items():
            torch.testing.assert_close(global_state[key].double(), value, rtol=0, atol=1e-7)
    final = load_file(sorted((result.run_dir / "checkpoints").glob("*.safetensors"))[-1])
    last = audited_round(result.run_dir, rounds[-1]["round"])[1]
    assert all(torch.equal(final[f"global/{key}"], value) for key, value in last.items())


def test_audit_files_are_listed_with_their_round_and_go_with_it(micro_config):
    config = micro_config("algorithm.name=fedavg", "federation.audit=true")
    run_dir = run_experiment(config).run_dir
    listed = json.loads((run_dir / ".fedexperts-run.json").read_text())["files"]
    assert {name for name in listed if name.startswith("audit/")} == {
        f"audit/round-{r:06d}/{name}.safetensors"
        for r in (1, 2)
        for name in ("global", "client-0", "client-1", "client-2", *(("initial",) if r == 1 else ()))
    }
    run_experiment(config, resume=True, resume_from=1)  # rolling back to round 1 drops round 2's audit, then redoes it
    assert (run_dir / "audit" / "round-000002" / "global.safetensors").exists()
    run_experiment(config, overwrite=True)  # an overwrite deletes the old audit with the rest


def test_no_audit_folder_by_default(micro_config):
    run_dir = run_experiment(micro_config()).run_dir
    assert not (run_dir / "audit").exists()

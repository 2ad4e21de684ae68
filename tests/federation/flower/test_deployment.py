"""A real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and SuperNode authentication."""

import json
import subprocess
import time

import pytest
from safetensors.torch import load_file

from fedexperts.federation.flower.app_dir import write_app
from fedexperts.federation.flower.certificates import write_node_key
from fedexperts.federation.flower.deployment import LocalDeployment, free_port
from fedexperts.federation.state import ClientStateStore
from fedexperts.runfiles import RunManifest
from tests.federation.helpers import assert_aggregates_are_accepted_means

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(path, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.5)


def test_flex_runs_on_a_tls_deployment_and_personal_state_stays_on_each_node(micro_config, tmp_path):
    config = micro_config("algorithm.name=flex", "federation.clients=2", "federation.min_clients=2")
    app = tmp_path / "app"
    write_app(config, app)
    with LocalDeployment(tmp_path / "deployment", nodes=2) as deployment:
        # a SuperNode whose key was never registered is refused
        private, _public = write_node_key(tmp_path / "rogue", "rogue")
        log = tmp_path / "rogue.log"
        with log.open("wb") as output:  # a file, not a pipe: the node's SuperExec child would hold a pipe open
            rogue = subprocess.Popen(
                deployment.node_command(private, free_port(), 1, tmp_path / "rogue-state"),
                env=deployment.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            assert rogue.wait(timeout=120) != 0
        assert "[code: 2004] Failed to activate SuperNode" in log.read_text()

        run_id = deployment.run(app)
        status, details = deployment.wait(run_id)
        assert status == "finished:completed", details

    run_dir = config.output_dir / config.name
    lines = records(run_dir)
    rounds = [line for line in lines if line["kind"] == "round"]
    assert [line["round"] for line in rounds] == [1, 2]
    assert all(entry["status"] == "ok" for line in rounds for entry in line["clients"].values())
    final = next(line for line in lines if line["kind"] == "final")
    assert all(entry["status"] == "ok" and entry["own"] for entry in final["clients"].values())
    for partition in (0, 1):
        own = deployment.state_dir(partition) / f"run-{RunManifest.load(run_dir).uid}" / f"partition-{partition}"
        state = load_file(own / f"client-{partition}.safetensors")
        assert state and all("personal" in name or "gate" in name for name in state), sorted(state)[:3]
        other = 1 - partition
        assert not list(deployment.state_dir(partition).rglob(f"client-{other}.safetensors"))
    assert not list(run_dir.rglob("client-*.safetensors"))  # nothing personal on the server's disk


def test_a_killed_supernode_fails_its_round_keeps_its_state_and_rejoins(micro_config, tmp_path):
    config = micro_config(
        "algorithm.name=flex",
        "federation.clients=2",
        "federation.min_clients=2",
        "federation.min_successful=1",
        "federation.rounds=6",
        # A backstop, not the verdict: the killed node's round ends when the SuperLink reports it unavailable
        # (two missed heartbeats, ~1 min); a live node's reply (a fresh ClientApp process importing torch per
        # message) may take long on a loaded machine and must not fail the round.
        "federation.reply_timeout=300",
        "federation.audit=true",
    )
    app = tmp_path / "app"
    write_app(config, app)
    with LocalDeployment(tmp_path / "deployment", nodes=2) as deployment:
        run_id = deployment.run(app)
        run_dir = config.output_dir / config.name
        wait_for(run_dir / "records" / "round-000001.json")
        deployment.kill_node(1)
        node_run = f"run-{RunManifest.load(run_dir).uid}"
        node_files = sorted((deployment.state_dir(1) / node_run).rglob("*.safetensors"))
        assert node_files  # what it trained in round 1, staged or committed
        for path in node_files:
            assert load_file(path)  # intact: readable safetensors, not a torn write
        wait_for(run_dir / "records" / "round-000002.json")
        deployment.restart_node(1)  # once the SuperLink has noticed the death (two missed heartbeats, ~1 min)
        status, details = deployment.wait(run_id)
        assert status == "finished:completed", details

    lines = records(run_dir)
    rounds = {line["round"]: line["clients"] for line in lines if line["kind"] == "round"}
    assert rounds[2]["client-0"]["status"] == "ok"
    assert rounds[2]["client-1"]["status"] == "failed"
    assert rounds[6]["client-1"]["status"] == "ok"  # rejoined after its restart
    final = next(line for line in lines if line["kind"] == "final")
    assert all(entry["status"] == "ok" for entry in final["clients"].values())
    node_run = f"run-{RunManifest.load(run_dir).uid}"
    state_file = deployment.state_dir(1) / node_run / "partition-1" / "client-1.safetensors"
    assert load_file(state_file)
    last_accepted = max(r for r, clients in rounds.items() if clients["client-1"]["status"] == "ok")
    assert ClientStateStore(state_file.parent).round_of("client-1") == last_accepted  # committed at the final message
    assert_aggregates_are_accepted_means(run_dir, [line for line in lines if line["kind"] == "round"])

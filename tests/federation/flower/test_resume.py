"""A Flower run killed mid-round continues where it stopped, and ends as the uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedexperts.config import ConfigError
from fedexperts.config_toml import config_toml
from fedexperts.errors import RunError
from fedexperts.federation.flower import run_simulation
from fedexperts.federation.flower.runconfig import config_from_run_config, config_to_run_config, run_control
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.runfiles import RunManifest

_SIMULATE = """
import sys
from pathlib import Path
from fedexperts.config import load_config
from fedexperts.federation.flower import run_simulation
run_simulation(load_config(Path(sys.argv[1]), []), Path(sys.argv[2]))
"""


def _staged(run_dir: Path, round_number: int) -> bool:
    return any((run_dir / "nodes").glob(f"run-*/partition-*/.staging/round-{round_number:06d}/*.safetensors"))


def _kill_mid_round(config_file: Path, run_dir: Path, round_number: int) -> None:
    """Run the simulation in its own process group and SIGKILL all of it (Ray included) once a node has
    staged its update of ``round_number``: the server has not committed that round."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SIMULATE, str(config_file), str(run_dir)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not _staged(run_dir, round_number):
            assert process.poll() is None, f"simulation exited (rc {process.returncode}) before round {round_number}"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _node_states(run_dir: Path) -> dict[str, dict]:
    return {path.name: load_file(path) for path in sorted((run_dir / "nodes").glob("run-*/partition-*/*.safetensors"))}


def test_a_simulation_killed_mid_round_resumes_bit_identical(micro_config, tmp_path):
    config = micro_config(
        "algorithm.name=flex", "federation.clients=2", "federation.min_clients=2", "federation.rounds=3"
    )
    config_file = tmp_path / "run.toml"
    config_file.write_text(config_toml(config))
    whole = run_simulation(config, tmp_path / "whole")

    killed = tmp_path / "killed"
    _kill_mid_round(config_file, killed, round_number=2)
    assert RunManifest.load(killed).rounds_done == 1, "the kill must land before round 2 is committed"
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        run_simulation(config, killed)
    resumed = run_simulation(config, killed, resume=True)

    assert [r["round"] for r in resumed.records if r["kind"] == "round"] == [1, 2, 3]
    final = {r["kind"]: r for r in whole.records}["final"]["clients"]
    assert {r["kind"]: r for r in resumed.records}["final"]["clients"] == final
    expected = load_file(whole.run_dir / "checkpoints" / "round-000003.safetensors")
    got = load_file(killed / "checkpoints" / "round-000003.safetensors")
    assert expected.keys() == got.keys()
    assert all((expected[name] == got[name]).all() for name in expected)
    personal_whole, personal_resumed = _node_states(whole.run_dir), _node_states(killed)
    assert personal_whole.keys() == personal_resumed.keys() == {"client-0.safetensors", "client-1.safetensors"}
    for name, tensors in personal_whole.items():
        assert all((tensors[key] == personal_resumed[name][key]).all() for key in tensors), name
    assert not any((killed / "nodes").glob("run-*/partition-*/.staging/*")), "nothing staged is left behind"
    runs = {path.name for path in (killed / "nodes").iterdir()}
    assert runs == {f"run-{RunManifest.load(killed).uid}"}, "the resumed run kept its nodes' states under one id"


def test_a_fresh_run_in_the_same_folder_gets_a_new_id(micro_config, tmp_path):
    """Nodes key states by the run's id: a run started over (--overwrite) never reads the old run's states."""
    config = micro_config()
    prepare_run_dir(config, tmp_path / "run", resume=False)
    uid = RunManifest.load(tmp_path / "run").uid
    prepare_run_dir(config, tmp_path / "run", resume=True)
    assert RunManifest.load(tmp_path / "run").uid == uid
    prepare_run_dir(config, tmp_path / "run", resume=False, overwrite=True)
    assert RunManifest.load(tmp_path / "run").uid not in ("", uid)


def test_run_control_keys_travel_in_the_run_config_and_are_checked(micro_config):
    flat = config_to_run_config(micro_config())
    assert flat["resume"] is False and flat["overwrite"] is False
    assert config_from_run_config(flat) == micro_config()
    assert run_control({**flat, "resume": True}) == {"resume": True, "overwrite": False}
    assert run_control({**flat, "resume": "true"})["resume"] is True
    with pytest.raises(ConfigError, match="run config resume='yes': expected true or false"):
        run_control({**flat, "resume": "yes"})
    with pytest.raises(ConfigError, match="choose one"):
        run_control({**flat, "resume": True, "overwrite": True})


def _final_state(run_dir: Path, node_dirs: list[Path]) -> tuple[dict, dict]:
    checkpoint = load_file(sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1])
    uid = RunManifest.load(run_dir).uid
    files = [path for folder in node_dirs for path in sorted(folder.glob(f"run-{uid}/partition-*/*.safetensors"))]
    personal = {path.name: load_file(path) for path in files}
    return checkpoint, personal


@pytest.mark.soak
@pytest.mark.parametrize("killed", ["serverapp", "superlink"])
def test_a_deployment_killed_mid_round_resumes_bit_identical(micro_config, tmp_path, killed):
    """On 127.0.0.1 with TLS: the ServerApp (or the whole SuperLink) dies mid-round 2; `flwr run` with
    resume=true continues, and the run ends as an uninterrupted run of the same config on the same nodes."""
    from fedexperts.federation.flower.app_dir import write_app
    from fedexperts.federation.flower.deployment import LocalDeployment

    config = micro_config(
        "algorithm.name=flex",
        "federation.clients=2",
        "federation.min_clients=2",
        "federation.rounds=3",
        "federation.reply_timeout=300",
    )
    whole, interrupted = config.model_copy(update={"name": "whole"}), config.model_copy(update={"name": "interrupted"})
    write_app(whole, tmp_path / "whole-app")
    write_app(interrupted, tmp_path / "app")
    with LocalDeployment(tmp_path / "deployment", nodes=2) as deployment:
        status, details = deployment.wait(deployment.run(tmp_path / "whole-app"))
        assert status == "finished:completed", details
        run_dir = interrupted.output_dir / interrupted.name
        deployment.run(tmp_path / "app")
        nodes = [deployment.state_dir(partition) for partition in (0, 1)]
        while not any(any(n.glob("run-*/partition-*/.staging/round-000002/*.safetensors")) for n in nodes):
            time.sleep(0.05)
        if killed == "serverapp":
            assert deployment.kill_serverapp() == 1
        else:
            deployment.kill_superlink()
            deployment.start_superlink()
            deployment._wait(lambda: deployment.online() >= 2, "the SuperNodes to reconnect")
        assert RunManifest.load(run_dir).rounds_done == 1, "the kill must land before round 2 is committed"
        status, details = deployment.wait(deployment.run(tmp_path / "app", "resume=true"))
        assert status == "finished:completed", details

    expected_checkpoint, expected_personal = _final_state(whole.output_dir / whole.name, nodes)
    checkpoint, personal = _final_state(run_dir, nodes)
    assert expected_checkpoint.keys() == checkpoint.keys()
    assert all((expected_checkpoint[k] == checkpoint[k]).all() for k in checkpoint)
    assert expected_personal.keys() == personal.keys() == {"client-0.safetensors", "client-1.safetensors"}
    for name, tensors in expected_personal.items():
        assert all((tensors[k] == personal[name][k]).all() for k in tensors), name

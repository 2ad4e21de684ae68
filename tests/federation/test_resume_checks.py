"""Resume verifies before it continues: each fault either recovers exactly or stops with one line naming the file."""

import json
import shutil

import pytest

from fedexperts.federation.inprocess import InProcessTransport, run_experiment
from fedexperts.federation.resume import ResumeError
from fedexperts.federation.state import CheckpointStore
from fedexperts.runfiles import MANIFEST, ManifestError
from tests.federation.helpers import Interrupt, assert_same_run, cheap_config, copy_run, fingerprint, stopped_after

FEDAVG = ("algorithm.name=fedavg", "algorithm.server.rule=fedavgm", "federation.rounds=3")
FLEX = ("algorithm.name=flex", "federation.rounds=2")


@pytest.fixture(scope="module")
def runs(micro_model_path, tmp_path_factory):
    """Finished references and runs stopped after a committed round, to copy: FedAvg (server state, no client
    state; checkpoints of rounds 1 and 2 kept) and FLEx (a personal state per client)."""
    folder = tmp_path_factory.mktemp("resume")

    def config(*overrides):
        return cheap_config(micro_model_path, folder, *overrides)

    return {
        "config": {"fedavg": config(*FEDAVG), "flex": config(*FLEX)},
        "fedavg": run_experiment(config(*FEDAVG), folder / "fedavg").run_dir,
        "flex": run_experiment(config(*FLEX), folder / "flex").run_dir,
        "fedavg-stopped": stopped_after(config(*FEDAVG), folder / "fedavg-stopped", 2),
        "flex-stopped": stopped_after(config(*FLEX), folder / "flex-stopped", 1),
    }


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_client_0_over(name):
    return lambda run: shutil.copy(run / "clients" / "client-0.safetensors", run / "clients" / name)


NO_POINT = "no earlier consistent point remains"
POINT_1 = "the newest consistent point is round 1: rerun with --resume-from 1"
FAULTS = {  # name: (template, tamper, what the one line must say)
    "truncated client state": (
        "flex-stopped",
        lambda run: truncate(run / "clients" / "client-1.safetensors"),
        rf"clients/client-1.safetensors has \d+ bytes, not the \d+ fedexperts wrote.*{NO_POINT}",
    ),
    "deleted client state": (
        "flex-stopped",
        lambda run: (run / "clients" / "client-1.safetensors").unlink(),
        rf"clients/client-1.safetensors is missing \(fedexperts wrote \d+ bytes there\).*{NO_POINT}",
    ),
    "swapped client state": (
        "flex-stopped",
        copy_client_0_over("client-1.safetensors"),
        r"clients/client-1.safetensors differs from what fedexperts wrote",
    ),
    "foreign client state": (
        "flex-stopped",
        copy_client_0_over("client-9.safetensors"),
        r"clients/client-9.safetensors was not written by this run; move it out",
    ),
    "deleted newest checkpoint": (
        "fedavg-stopped",
        lambda run: (run / "checkpoints" / "round-000002.safetensors").unlink(),
        rf"after round 2: checkpoints/round-000002.safetensors is missing.*; {POINT_1}$",
    ),
    "truncated newest checkpoint": (
        "fedavg-stopped",
        lambda run: truncate(run / "checkpoints" / "round-000002.safetensors"),
        rf"checkpoints/round-000002.safetensors has \d+ bytes.*; {POINT_1}$",
    ),
    "checkpoint of another round": (
        "fedavg-stopped",
        lambda run: (run / "checkpoints" / "round-000001.safetensors").rename(
            run / "checkpoints" / "round-000009.safetensors"
        ),
        r"checkpoints/round-000009.safetensors was not written by this run",
    ),
    "corrupt newest round record": (
        "fedavg-stopped",
        lambda run: garble(run / "records" / "round-000002.json"),
        rf"records/round-000002.json differs from what fedexperts wrote.*; {POINT_1}$",
    ),
    "deleted first round record": (
        "fedavg-stopped",
        lambda run: (run / "records" / "round-000001.json").unlink(),
        rf"records/round-000001.json is missing.*{NO_POINT}",
    ),
    "corrupt run record": (
        "fedavg-stopped",
        lambda run: (run / "records" / "run.json").write_text("{"),
        rf"records/run.json has 1 bytes.*{NO_POINT}",
    ),
    "corrupt final record": (
        "fedavg",
        lambda run: garble(run / "records" / "final.json"),
        r"after round 3: records/final.json differs.*rerun with --resume-from 3$",
    ),
    "client state newer than its checkpoint": (
        "flex",
        lambda run: (run / "checkpoints" / "round-000002.safetensors").unlink(),
        rf"checkpoints/round-000002.safetensors is missing.*{NO_POINT}",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_run_is_not_continued_and_the_refusal_names_the_file(runs, tmp_path, fault):
    template, tamper, message = FAULTS[fault]
    run = copy_run(runs[template], tmp_path / "run")
    tamper(run)
    before = fingerprint(run)
    with pytest.raises(ResumeError, match=message) as error:
        run_experiment(runs["config"][template.split("-")[0]], run, resume=True)
    assert "\n" not in str(error.value)
    assert fingerprint(run) == before  # the refused resume changed nothing


def test_an_unreadable_manifest_is_one_line_naming_it(runs, tmp_path):
    run = copy_run(runs["fedavg-stopped"], tmp_path / "run")
    (run / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match=rf"{MANIFEST}: unreadable run manifest"):
        run_experiment(runs["config"]["fedavg"], run, resume=True)


@pytest.mark.parametrize("round_number", [0, 3])
def test_resume_from_a_round_the_run_has_not_completed_is_refused(runs, tmp_path, round_number):
    run = copy_run(runs["fedavg-stopped"], tmp_path / "run")
    with pytest.raises(ResumeError, match=rf"--resume-from {round_number}: .* has completed rounds 1 to 2"):
        run_experiment(runs["config"]["fedavg"], run, resume_from=round_number)


def test_resume_from_the_offered_point_ends_where_an_uninterrupted_run_ends(runs, tmp_path):
    run = copy_run(runs["fedavg-stopped"], tmp_path / "run")
    (run / "checkpoints" / "round-000002.safetensors").unlink()
    run_experiment(runs["config"]["fedavg"], run, resume_from=1)
    assert_same_run(runs["fedavg"], run)
    assert CheckpointStore(run / "checkpoints").rounds() == [2, 3]


def test_resume_from_the_last_round_redoes_a_damaged_final_evaluation_exactly(runs, tmp_path):
    run = copy_run(runs["fedavg"], tmp_path / "run")
    garble(run / "records" / "final.json")
    run_experiment(runs["config"]["fedavg"], run, resume_from=3)
    assert_same_run(runs["fedavg"], run)


@pytest.mark.parametrize("template", ["fedavg-stopped", "flex-stopped"])
def test_an_intact_stopped_run_resumes_exactly(runs, tmp_path, template):
    run = copy_run(runs[template], tmp_path / "run")
    run_experiment(runs["config"][template.split("-")[0]], run, resume=True)
    assert_same_run(runs[template.split("-")[0]], run)


def test_a_kill_between_the_round_commit_and_moving_the_client_states_resumes_exactly(runs, tmp_path, monkeypatch):
    def killed(self, round_number, accepted):
        raise Interrupt

    config = runs["config"]["flex"]
    with monkeypatch.context() as patch:
        patch.setattr(InProcessTransport, "commit", killed)
        with pytest.raises(Interrupt):
            run_experiment(config, tmp_path / "run")
    assert list((tmp_path / "run" / "clients" / ".staging" / "round-000001").iterdir())  # listed, not yet moved
    run_experiment(config, tmp_path / "run", resume=True)
    assert_same_run(runs["flex"], tmp_path / "run")


def test_a_kill_after_writing_a_checkpoint_before_committing_it_redoes_the_round_exactly(runs, tmp_path, monkeypatch):
    real = CheckpointStore.save

    def killed_after_round_two(self, round_number, state):
        path = real(self, round_number, state)
        if round_number == 2:
            raise Interrupt
        return path

    config = runs["config"]["fedavg"]
    with monkeypatch.context() as patch:
        patch.setattr(CheckpointStore, "save", killed_after_round_two)
        with pytest.raises(Interrupt):
            run_experiment(config, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "round-000002.safetensors").exists()  # written, not committed
    run_experiment(config, tmp_path / "run", resume=True)
    assert_same_run(runs["fedavg"], tmp_path / "run")


def test_a_client_state_deleted_mid_run_fails_that_client_instead_of_restarting_it(runs, tmp_path):
    config = runs["config"]["flex"]
    run = tmp_path / "run"

    def delete_after_round_one(record):
        if record["round"] == 1:
            (run / "clients" / "client-1.safetensors").unlink()

    result = run_experiment(config, run, on_round=delete_after_round_one)
    client = result.records[2]["clients"]["client-1"]
    assert client["status"] == "failed" and "committed personal state of client-1 is missing" in client["error"]
    assert json.loads((run / "records" / "round-000002.json").read_text())["clients"]["client-0"]["status"] == "ok"

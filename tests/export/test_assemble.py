"""A run directory -> the model each client was evaluated on, and the global model."""

import pytest
import torch

from fedexperts.config import load_config
from fedexperts.errors import FedExpertsError
from fedexperts.export.assemble import assemble_client, assemble_global
from fedexperts.export.source import open_run
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.moe.personal import grafts, suspended_grafts
from tests.export.conftest import CLIENTS, VARIANTS, logits_of


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_assembled_model_is_the_one_each_client_was_evaluated_on(variant, federation, base_logits):
    run = federation(variant)
    assert sorted(run.logits) == list(CLIENTS)
    for client in CLIENTS:
        evaluated = run.logits[client]
        assert (evaluated - base_logits).abs().max() > 1e-3  # the run changed the model: equality below can fail
        model = assemble_client(open_run(run.run_dir), client).model
        torch.testing.assert_close(logits_of(model), evaluated, rtol=0, atol=0)


def test_clients_of_a_personalized_algorithm_get_different_models(federation):
    logits = federation("flex").logits
    assert (logits["client-0"] - logits["client-1"]).abs().max() > 1e-3


def test_the_global_model_of_fedavg_is_every_client_model(federation):
    run = federation("fedavg")
    model = assemble_global(open_run(run.run_dir)).model
    torch.testing.assert_close(logits_of(model), run.logits["client-0"], rtol=0, atol=0)


def test_the_global_flex_model_is_the_client_model_without_its_grafts(federation):
    run = federation("flex")
    client = assemble_client(open_run(run.run_dir), "client-0").model
    assert grafts(client)
    with suspended_grafts(client):
        shared = logits_of(client)
    model = assemble_global(open_run(run.run_dir)).model
    assert not grafts(model)
    torch.testing.assert_close(logits_of(model), shared, rtol=0, atol=0)


def test_local_training_has_no_global_model(federation):
    with pytest.raises(FedExpertsError, match=r"--global: local shares nothing.*export a client's model with --client"):
        assemble_global(open_run(federation("local").run_dir))


def test_an_unknown_client_is_named_with_the_run_s_clients(federation):
    run_dir = federation("fedavg").run_dir
    with pytest.raises(FedExpertsError, match=r"--client 'client-7' is not a client of .*client-0 \.\.\. client-1"):
        open_run(run_dir).client_index("client-7")


def test_a_run_without_a_finished_round_has_nothing_to_export(export_base, tmp_path):
    config = load_config(None, [f'model.name="{export_base}"'])
    prepare_run_dir(config, tmp_path / "run", resume=False)  # what a run holds before its first round commits
    with pytest.raises(FedExpertsError, match="has no finished round: nothing to export yet"):
        open_run(tmp_path / "run")


def test_a_folder_fedexperts_did_not_make_is_no_run(tmp_path):
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(FedExpertsError, match=r"is not a fedexperts run directory \(no .fedexperts-run.json\)"):
        open_run(tmp_path)
    with pytest.raises(FedExpertsError, match="no such run directory"):
        open_run(tmp_path / "missing")


def test_a_changed_checkpoint_is_refused(federation, tmp_path):
    import shutil

    run_dir = shutil.copytree(federation("fedavg").run_dir, tmp_path / "run")
    checkpoint = next((run_dir / "checkpoints").glob("round-*.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(FedExpertsError, match=r"round-000001.safetensors differs from what fedexperts wrote"):
        assemble_client(open_run(run_dir), "client-0")


def test_a_client_whose_personal_state_is_not_in_the_run_directory_is_refused(federation, tmp_path):
    import shutil

    from fedexperts.runfiles import RunManifest

    run_dir = shutil.copytree(federation("flex").run_dir, tmp_path / "run")
    state = run_dir / "clients" / "client-0.safetensors"
    state.unlink()
    with pytest.raises(FedExpertsError, match=r"clients/client-0.safetensors is missing \(fedexperts wrote"):
        assemble_client(open_run(run_dir), "client-0")
    RunManifest.load(run_dir).forget([state])  # as in a Flower run: the state lives on the SuperNode
    with pytest.raises(FedExpertsError, match="holds no personal state of client-0, which trained in round 1"):
        assemble_client(open_run(run_dir), "client-0")

"""Run directories hold runs only: fedexperts never deletes, overwrites or blocks on what it did not write."""

import os
import shutil
import stat

import pytest
from typer.testing import CliRunner

from fedexperts.cli import app
from fedexperts.config import ConfigError
from fedexperts.errors import RunError
from fedexperts.federation import inprocess
from fedexperts.federation.inprocess import run_experiment
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.reporting import write_report
from fedexperts.runfiles import MANIFEST, RunManifest
from tests.federation.helpers import cheap_config, copy_run, fingerprint


@pytest.fixture(scope="module")
def finished(micro_model_path, tmp_path_factory):
    """A finished one-round FLEx run (client states, checkpoint, records, report) to copy, and its config."""
    folder = tmp_path_factory.mktemp("safety")
    config = cheap_config(micro_model_path, folder, "algorithm.name=flex", "federation.rounds=1")
    result = run_experiment(config, folder / "template")
    write_report(result.run_dir)
    return config, result.run_dir


def user_folder(folder):
    """What a user keeps in a project folder: notes, data, their own config."""
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "data" / "rows.csv").write_text("a,b\n1,2\n")
    (folder / "config.toml").write_text('name = "mine"\n')
    return folder


def one_line(error):
    text = str(error.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize(("resume", "overwrite"), [(False, False), (False, True), (True, False), (True, True)])
def test_a_folder_of_user_files_is_never_taken_for_a_run(finished, tmp_path, resume, overwrite):
    config, _template = finished
    folder = user_folder(tmp_path / "myproj")
    before = fingerprint(folder)
    with pytest.raises(RunError) as error:
        prepare_run_dir(config, folder, resume=resume, overwrite=overwrite)
    one_line(error)
    assert fingerprint(folder) == before


def _edit(path):
    path.write_bytes(path.read_bytes() + b"\n# mine\n")


FOREIGN = {
    "notes.txt": lambda run: (run / "notes.txt").write_text("mine"),
    "data/": lambda run: (run / "data").mkdir() or (run / "data" / "rows.csv").write_text("1,2"),
    "scratch/": lambda run: (run / "scratch").mkdir(),
    "records/notes.json": lambda run: (run / "records" / "notes.json").write_text("{}"),
    "checkpoints/round-000007.safetensors": lambda run: shutil.copy(
        run / "checkpoints" / "round-000001.safetensors", run / "checkpoints" / "round-000007.safetensors"
    ),
    "clients/mine.safetensors": lambda run: shutil.copy(
        run / "clients" / "client-0.safetensors", run / "clients" / "mine.safetensors"
    ),
    "link": lambda run: (run / "link").symlink_to(run.parent / "outside.txt"),
    "summary.md": lambda run: _edit(run / "summary.md"),
    "config.toml": lambda run: _edit(run / "config.toml"),
    "clients/client-1.safetensors": lambda run: shutil.copy(
        run / "clients" / "client-0.safetensors", run / "clients" / "client-1.safetensors"
    ),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_overwrite_refuses_a_run_holding_anything_fedexperts_did_not_write(finished, tmp_path, name):
    config, template = finished
    (tmp_path / "outside.txt").write_text("kept")
    run = copy_run(template, tmp_path / "run")
    FOREIGN[name](run)
    before = fingerprint(tmp_path)
    with pytest.raises(RunError, match="would delete only what fedexperts wrote") as error:
        prepare_run_dir(config, run, resume=False, overwrite=True)
    assert name in one_line(error)
    assert fingerprint(tmp_path) == before


def test_overwrite_deletes_exactly_what_fedexperts_wrote_and_starts_over(finished, tmp_path):
    from fedexperts.analysis import analyse_run, plot_analysis

    config, template = finished
    run = copy_run(template, tmp_path / "run")
    plot_analysis(analyse_run(run), run)  # `fedexperts routing` lists its plots too
    (run / ".metrics.jsonl.0a1b2c3d.tmp").write_text("half")  # an atomic write killed half-way
    staged = run / "clients" / ".staging" / "round-000002"
    staged.mkdir(parents=True)
    shutil.copy(run / "clients" / "client-0.safetensors", staged / "client-0.safetensors")
    other = cheap_config(config.model.name, tmp_path, "algorithm.name=fedavg", "federation.rounds=1")
    prepare_run_dir(other, run, resume=False, overwrite=True)
    assert sorted(path.name for path in run.iterdir()) == sorted([MANIFEST, "config.toml"])
    manifest = RunManifest.load(run)
    assert manifest is not None and list(manifest.files) == ["config.toml"] and manifest.rounds_done == 0
    assert 'name = "fedavg"' in (run / "config.toml").read_text()


def test_resume_and_overwrite_together_are_refused_and_nothing_is_deleted(finished, tmp_path):
    config, template = finished
    run = copy_run(template, tmp_path / "run")
    before = fingerprint(run)
    with pytest.raises(RunError, match="choose one"):
        prepare_run_dir(config, run, resume=True, overwrite=True)
    assert fingerprint(run) == before


@pytest.mark.parametrize("name", ["../../escape", "/tmp/escape", "a/../../b", "."])
def test_run_names_that_leave_output_dir_are_refused(finished, tmp_path, name):
    config, _template = finished
    with pytest.raises(ConfigError, match=r"name: .*relative folder name inside output_dir"):
        cheap_config(config.model.name, tmp_path / "out", f'name="{name}"')
    assert not (tmp_path / "out").exists()


def _bad_data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"colour": "blue"}\n')
    return f'data.source="{path}"'


def _every_client_fails(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(inprocess, "run_client", boom)


FAILED_STARTS = {
    "model": lambda tmp_path, monkeypatch: f'model.name="{tmp_path / "no-such-model"}"',
    "data": lambda tmp_path, monkeypatch: _bad_data(tmp_path),
    "round one": _every_client_fails,
}


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "empty folder"])
@pytest.mark.parametrize("failure", sorted(FAILED_STARTS))
def test_a_start_that_fails_before_round_one_leaves_nothing_that_blocks_the_corrected_rerun(
    finished, tmp_path, monkeypatch, failure, existing
):
    config, _template = finished
    run = tmp_path / "run"
    if existing:
        run.mkdir()
    broken = FAILED_STARTS[failure](tmp_path, monkeypatch)
    overrides = ("algorithm.name=fedavg", "federation.rounds=1")
    with pytest.raises(Exception, match=r"no model folder|rows.jsonl|boom") as error:
        run_experiment(cheap_config(config.model.name, tmp_path, *overrides, *([broken] if broken else [])), run)
    assert "\n" not in str(error.value)
    assert run.is_dir() == existing and (not existing or not any(run.iterdir()))
    if failure == "round one":
        monkeypatch.undo()
        result = run_experiment(cheap_config(config.model.name, tmp_path, *overrides), run)
        assert result.records[-1]["kind"] == "final"


def test_a_stub_of_a_killed_start_is_replaced_by_a_start_with_another_config(finished, tmp_path):
    config, _template = finished
    run = tmp_path / "run"
    prepare_run_dir(config, run, resume=False)  # then killed before its first round
    other = cheap_config(config.model.name, tmp_path, "algorithm.name=fedavg")
    prepare_run_dir(other, run, resume=False)
    assert 'name = "fedavg"' in (run / "config.toml").read_text()


def test_output_files_get_the_ordinary_modes(finished):
    _config, template = finished
    umask = os.umask(0)
    os.umask(umask)
    files = [path for path in template.rglob("*") if path.is_file()]
    assert len(files) > 8
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


@pytest.mark.parametrize(("resume", "overwrite", "message"), [(True, False, "older fedexperts"), (False, True, "")])
def test_a_run_of_an_older_fedexperts_is_neither_resumed_nor_deleted(finished, tmp_path, resume, overwrite, message):
    config, template = finished
    run = copy_run(template, tmp_path / "run")
    (run / MANIFEST).unlink()
    before = fingerprint(run)
    with pytest.raises(RunError, match=f"holds no fedexperts run.*{message}"):
        prepare_run_dir(config, run, resume=resume, overwrite=overwrite)
    assert fingerprint(run) == before


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume", "--overwrite"]])
def test_the_cli_refuses_to_overwrite_a_project_folder_in_one_line(micro_model_path, tmp_path, flags):
    from tests.conftest import MICRO_RUN

    project = user_folder(tmp_path / "myproj")
    (project / "config.toml").write_text(f'model.name = "{micro_model_path}"\n')
    before = fingerprint(project)
    arguments = ["run", str(project / "config.toml"), *MICRO_RUN, "--run-dir", str(project), *flags]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert fingerprint(project) == before


def test_a_diverging_client_is_failed_with_its_reason_and_the_round_goes_on(micro_model_path, tmp_path, monkeypatch):
    from fedexperts.federation import client as client_module
    from tests.conftest import MICRO_RUN

    real = client_module.train_local

    def client_1_far_too_fast(model, batches, settings, **kwargs):
        if kwargs["description"] == "client-1":
            settings = settings.model_copy(update={"learning_rate": 1e6})
        return real(model, batches, settings, **kwargs)

    monkeypatch.setattr(client_module, "train_local", client_1_far_too_fast)
    arguments = ["run", f'model.name="{micro_model_path}"', f'output_dir="{tmp_path}"', *MICRO_RUN, "eval.every=0"]
    result = CliRunner().invoke(app, [*arguments, "federation.rounds=1"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "round 1: 2/3 clients ok" in output
    assert "client-1 (2/3): failed: DivergenceError: client-1 diverged: the trainable weights' RMS went from" in output
    assert "lower train.learning_rate" in output


def test_a_learning_rate_of_a_million_fails_the_run_in_one_line_and_leaves_no_run_behind(micro_model_path, tmp_path):
    from tests.conftest import MICRO_RUN

    arguments = ["run", f'model.name="{micro_model_path}"', f'output_dir="{tmp_path}"', *MICRO_RUN, "eval.every=0"]
    result = CliRunner().invoke(app, [*arguments, "train.learning_rate=1e6", "federation.rounds=1"])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    output = " ".join(result.output.split())
    assert "round 1: 0 of 3 clients succeeded" in output and "diverged" in output
    assert not (tmp_path / "default").exists()  # a corrected rerun starts afresh

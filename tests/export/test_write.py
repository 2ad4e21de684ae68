"""Export folders: which kind each algorithm's model becomes, the logits they give back, and the --out rules."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fedexperts.errors import FedExpertsError
from fedexperts.export import export_client, export_global, load_exported
from fedexperts.export.manifest import MANIFEST_FILE
from tests.export.conftest import CLIENTS, VARIANTS, expected_kind, logits_of


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_exported_client_model_gives_the_logits_it_was_evaluated_with(variant, federation, tmp_path):
    run = federation(variant)
    for client in CLIENTS:
        if expected_kind(variant, client) == "refused":
            with pytest.raises(FedExpertsError, match=r"mixes its LoRA adapters \(default, local\) per example"):
                export_client(run.run_dir, client, tmp_path / client)
            assert not (tmp_path / client).exists()
            continue
        result = export_client(run.run_dir, client, tmp_path / client)
        assert result.kind == expected_kind(variant, client)
        manifest = json.loads((tmp_path / client / MANIFEST_FILE).read_text())
        assert manifest["kind"] == result.kind and manifest["template"] == "chat"
        exported = load_exported(tmp_path / client)
        torch.testing.assert_close(logits_of(exported.model), run.logits[client], rtol=0, atol=1e-5)


def test_the_global_model_exports_as_a_stock_checkpoint(federation, tmp_path):
    run = federation("flex")
    result = export_global(run.run_dir, tmp_path / "global")
    assert (result.kind, result.lora) == ("stock", "merged")
    assert "global (shared) model" in (tmp_path / "global" / "README.md").read_text()


def test_feddpas_global_model_is_its_shared_adapter_alone(federation, tmp_path):
    run = federation("feddpa")
    result = export_global(run.run_dir, tmp_path / "global")
    assert (result.kind, result.lora) == ("stock", "merged")
    exported = load_exported(tmp_path / "global")
    assert not any("lora" in name for name, _ in exported.model.named_parameters())


def test_a_non_empty_out_folder_is_refused_and_left_as_it_was(federation, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FedExpertsError, match=r"--out .* is not empty"):
        export_client(federation("fedavg").run_dir, "client-0", out)
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedExpertsError, match="is not a folder"):
        export_client(federation("fedavg").run_dir, "client-0", tmp_path / "file")


def test_an_empty_out_folder_is_filled(federation, tmp_path):
    (tmp_path / "out").mkdir()
    export_client(federation("fedavg").run_dir, "client-0", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_a_failed_export_leaves_nothing_behind(federation, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk trouble")

    monkeypatch.setattr("fedexperts.export.write.write_stock", broken)
    with pytest.raises(RuntimeError, match="disk trouble"):
        export_client(federation("fedavg").run_dir, "client-0", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_needs_lora_and_a_stock_architecture(federation, tmp_path):
    with pytest.raises(FedExpertsError, match="--lora adapter: client-0's model has no LoRA"):
        export_client(federation("dense").run_dir, "client-0", tmp_path / "dense", lora="adapter")
    with pytest.raises(FedExpertsError, match=r"--lora adapter: client-0's model \(flex\) is not a stock architecture"):
        export_client(federation("flex").run_dir, "client-0", tmp_path / "flex", lora="adapter")
    assert list(tmp_path.iterdir()) == []


def test_weights_are_written_in_the_chosen_dtype(federation, tmp_path):
    run = federation("fedavg")
    result = export_client(run.run_dir, "client-0", tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    exported = load_exported(tmp_path / "bf16", dtype="float32")
    torch.testing.assert_close(logits_of(exported.model), run.logits["client-0"], rtol=0.05, atol=0.05)


def test_every_export_has_a_model_card_naming_its_origin(federation, export_base, tmp_path):
    run = federation("flex")
    export_client(run.run_dir, "client-1", tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    for expected in (
        "library_name: fedexperts",
        "client `client-1`",
        "- algorithm: `flex`",
        f"- base model: `{export_base}`",
        "after round 1 of 1, the last",
        "own test split (final): rouge_l",
        "personal experts copied from",
        "fedexperts.load_personalized",
    ):
        assert expected in card, expected


def test_the_export_api_is_public_and_import_fedexperts_stays_light():
    import fedexperts
    from fedexperts.export import generation, personalized, write

    assert fedexperts.export_client is write.export_client and fedexperts.export_global is write.export_global
    assert fedexperts.generate is generation.generate and fedexperts.load_exported is generation.load_exported
    assert fedexperts.load_personalized is personalized.load_personalized
    code = "import sys, fedexperts; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

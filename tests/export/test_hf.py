"""Stock exports load with transformers (and peft) alone: in a process where fedexperts cannot be imported."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedexperts.export import export_client
from fedexperts.models.builtin import RECIPES
from tests.export.conftest import fixed_inputs

STOCK = [
    ("local", "client-0"),
    ("fedavg", "client-0"),
    ("fedprox", "client-1"),
    ("dense", "client-0"),
    ("random-expert", "client-0"),
    ("fedmoe", "client-0"),
    ("fedmoe", "client-1"),
    ("random-moe", "client-1"),
    ("fedmoe-measured", "client-0"),
]
"""A client of every algorithm whose model is a stock architecture; FedMoE's and randomMoE's client-1 hold a
sub-MoE of 3 experts per layer, client-0 the full model (it profiles)."""
CASES = [(variant, client, lora) for variant, client in STOCK for lora in ("merged", "adapter")]
CASES.remove(("dense", "client-0", "adapter"))  # dense trains no LoRA: nothing to save as an adapter

LOADER = """
import json, sys

class NoFedexperts:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fedexperts":
            raise ImportError("fedexperts is not importable here")
        return None

sys.meta_path.insert(0, NoFedexperts())
import peft, torch, transformers
from safetensors.torch import load_file, save_file

jobs = json.loads(sys.argv[1])
inputs = load_file(sys.argv[2])
logits, experts = {}, {}
for job in jobs:
    model = transformers.AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32)
    experts[job["name"]] = model.config.num_experts
    if job["adapter"]:
        model = peft.PeftModel.from_pretrained(model, job["folder"] + "/adapter")
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["folder"])
    assert tokenizer("a test")["input_ids"], "empty tokenizer"
    with torch.no_grad():
        logits[job["name"]] = model.eval()(**inputs).logits.float().contiguous()
save_file(logits, sys.argv[3])
assert "fedexperts" not in sys.modules
print(json.dumps(experts))
"""


@pytest.fixture(scope="module")
def loaded_without_fedexperts(federation, tmp_path_factory):
    """Every :data:`STOCK` client exported merged and as an adapter, then run by :data:`LOADER` in a clean process."""
    folder = tmp_path_factory.mktemp("stock-exports")
    jobs = []
    for variant, client, lora in CASES:
        name = f"{variant}-{client}-{lora}"
        result = export_client(federation(variant).run_dir, client, folder / name, lora=lora)
        assert result.kind == "stock"
        jobs.append({"name": name, "folder": str(folder / name), "adapter": lora == "adapter"})
    save_file(fixed_inputs(RECIPES["micro"].vocab_size), folder / "inputs.safetensors")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, json.dumps(jobs), str(folder / "inputs.safetensors"), str(folder / "out")],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**environment, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(folder / "out"), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("variant", "client", "lora"), CASES, ids=["-".join(case) for case in CASES])
def test_a_stock_export_gives_the_in_run_logits_without_fedexperts(
    loaded_without_fedexperts, federation, variant, client, lora
):
    logits, _ = loaded_without_fedexperts
    expected = federation(variant).logits[client]
    torch.testing.assert_close(logits[f"{variant}-{client}-{lora}"], expected, rtol=0, atol=1e-5)


def test_a_uniform_sub_moe_is_a_stock_model_of_its_kept_expert_count(loaded_without_fedexperts):
    _, experts = loaded_without_fedexperts
    assert experts["fedmoe-client-1-merged"] == experts["random-moe-client-1-merged"] == 3
    assert experts["fedmoe-client-0-merged"] == experts["fedavg-client-0-merged"] == 8


def test_an_adapter_is_a_peft_adapter_over_the_exported_base(federation, tmp_path):
    export_client(federation("fedavg").run_dir, "client-0", tmp_path / "out", lora="adapter")
    settings = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["lora_alpha"]) == ("LORA", 8, 16)
    assert settings["base_model_name_or_path"] is None
    assert len(settings["target_modules"]) == 8  # q, k, v, o of both layers
    base = load_file(tmp_path / "out" / "model.safetensors")
    assert not any("lora" in key for key in base)

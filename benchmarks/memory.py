"""Client memory: what one client's training round holds and peaks at, loaded from a saved checkpoint.

A random-weight OLMoE (hidden 512, 16 experts, 4 layers, float32) is saved with ``save_pretrained``
(one tensor per expert, as on the hub) to a temporary folder. Each case then runs in a fresh
Python process, as a device would: it builds the client's model the way the client step does and
trains 3 steps (batch 4 x 128 tokens). A FedMoE client is a Flower-node client: it prepares the
algorithm on a meta-device model, reads its downlink (written by this process, the "server"),
and loads only its sub-MoE with :func:`fedexperts.models.load_sub_moe` (``federation.client_model
= "sub-moe"``); the *shared base* row builds the sub-MoE as a view over the fully loaded model
instead (``"shared"``). The other algorithms load the whole model.

*Weights held* is the unique tensor storage of what the process holds (parameters and buffers,
each storage once). *Analytic weights* is what the client's model needs by its parameter counts
(for FedMoE, the sub-MoE's bytes as its budget search counts them). *Peak RSS growth* is the
process's peak resident memory during the round minus its resident memory after imports;
*analytic total* adds a gradient and AdamW's two moments per trainable parameter (activations
are not in it). With a GPU the model lives there and the CUDA allocator's peak is reported too.

    python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Table

CASES: dict[str, tuple[str, float | None, str]] = {
    "MoE as dense (every weight trained)": ("dense", None, "full"),
    "FedAvg (attention LoRA)": ("fedavg", None, "full"),
    "FLEx (attention LoRA + personal expert per layer)": ("flex", None, "full"),
    "FedMoE, budget = full model": ("fedmoe", 1.0, "sub-moe"),
    "FedMoE, budget 0.6": ("fedmoe", 0.6, "sub-moe"),
    "FedMoE, budget 0.4": ("fedmoe", 0.4, "sub-moe"),
    "FedMoE, budget 0.6, view over the shared base": ("fedmoe", 0.6, "shared"),
}
MIB = 2**20
MODEL: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 256,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 2048,
}


def _algorithm(name: str, budget: float | None) -> Any:
    from fedexperts.algorithms import build_algorithm
    from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions
    from fedexperts.algorithms.registry import config_class

    if name == "fedmoe":
        config = FedMoEConfig(fedmoe=FedMoEOptions(budget_fraction=budget or 1.0, full_budget_every=0))
    else:
        config = config_class(name)()
    return build_algorithm(config, client_ids=["client-0"])


# -- the "server": the checkpoint and each FedMoE client's downlink ----------------------------------


def _save_checkpoint(folder: Path) -> None:
    from fedexperts.models import tiny_model

    tiny_model("olmoe", **MODEL).save_pretrained(folder)


def _write_downlink(folder: Path, budget: float, target: Path) -> None:
    """The downlink of a FedMoE client holding the most experts per layer that fit ``budget``, as wire bytes."""
    import transformers

    from fedexperts.federation.payload import encode
    from fedexperts.interface import ClientInfo
    from fedexperts.moe.families import moe_layers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    algorithm = _algorithm("fedmoe", budget)
    algorithm.prepare(model)
    layers = moe_layers(model)
    count = max(layer.top_k for layer in layers)
    for candidate in range(min(layer.num_experts for layer in layers), count - 1, -1):
        if algorithm.memory([list(range(candidate))] * len(layers)) <= budget * algorithm.full_bytes:
            count = candidate
            break
    algorithm.assign("client-0", [list(range(count))] * len(layers))
    downlink = algorithm.downlink(algorithm.initial_global_state(model), ClientInfo("client-0", 8))
    target.write_bytes(encode(downlink))


# -- one client, in a fresh process -----------------------------------------------------------------


def _one_case(name: str, budget: float | None, mode: str, folder: Path, downlink: Path | None) -> dict[str, Any]:
    """Run one client in this process; return held, analytic and measured bytes."""
    import psutil
    import torch

    import fedexperts.algorithms
    import fedexperts.models
    import fedexperts.training  # noqa: F401  (imported before the baseline, like everything the client needs)
    from fedexperts.federation.accounting import peak_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = psutil.Process().memory_info().rss  # not ru_maxrss: Linux carries it over from the parent's exec
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with peak_memory("cpu") as peak:
        result = _build_and_train(name, budget, mode, folder, downlink, device)
    result["rss_growth"] = peak.bytes - baseline
    if device == "cuda":
        result["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return result


def _build_and_train(
    name: str, budget: float | None, mode: str, folder: Path, downlink: Path | None, device: str
) -> dict[str, Any]:
    import torch
    from torch import nn

    from fedexperts.config import TrainConfig
    from fedexperts.experiment import ClientModels
    from fedexperts.federation.accounting import held_bytes
    from fedexperts.federation.payload import decode
    from fedexperts.interface import ClientInfo, LocalData
    from fedexperts.models import load_meta, load_model
    from fedexperts.training import train_local

    algorithm = _algorithm(name, budget)
    client = ClientInfo("client-0", 8)
    if mode == "sub-moe":  # a node: the algorithm is prepared on a meta-device model, the client loads its sub-MoE
        assert downlink is not None
        base = load_meta(folder).model
        algorithm.prepare(base)
        received = decode(downlink.read_bytes())
        model = ClientModels(folder, device=device).model_for(algorithm, base, received)
    else:
        base = load_model(folder, device=device).model.train()
        algorithm.prepare(base)
        received = (
            decode(downlink.read_bytes())
            if downlink
            else algorithm.downlink(algorithm.initial_global_state(base), client)
        )
        model = base
    client_model = algorithm.setup_client(model, received, None, LocalData(client)).model
    held = held_bytes(nn.ModuleList([base, client_model]))
    trainable = sum(p.numel() * p.element_size() for p in client_model.parameters() if p.requires_grad)
    if name == "fedmoe":
        structure = [received.metadata["fedmoe_held"][layer] for layer in algorithm.layout.layer_names]
        weights = algorithm.memory(structure)
    else:
        weights = sum(t.numel() * t.element_size() for t in (*client_model.parameters(), *client_model.buffers()))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (4, 128), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    train_local(client_model.train(), [batch], TrainConfig(steps_per_round=3))
    return {"held": held, "weights": weights, "trainable": trainable, "analytic": weights + 3 * trainable}


def run() -> Table:
    import torch

    gpu = torch.cuda.is_available()
    columns = [
        "client",
        "weights held",
        "analytic weights",
        "held / analytic",
        "analytic total (weights + 3 x trainable)",
        "peak RSS growth",
        "RSS growth / analytic total",
    ]
    table = Table(
        "Client memory for one training round, loaded from a saved checkpoint (OLMoE hidden 512, 16 experts, "
        "4 layers, float32)",
        [*columns, "CUDA allocator peak"] if gpu else columns,
    )
    held: dict[float, int] = {}
    with tempfile.TemporaryDirectory(prefix="fedexperts-memory-") as scratch:
        folder = Path(scratch) / "olmoe"
        _save_checkpoint(folder)
        for label, (name, budget, mode) in CASES.items():
            command = [
                sys.executable,
                "-m",
                "benchmarks.memory",
                "--case",
                name,
                "--mode",
                mode,
                "--folder",
                str(folder),
            ]
            if budget is not None:
                downlink = Path(scratch) / f"downlink-{budget}.safetensors"
                if not downlink.exists():
                    _write_downlink(folder, budget, downlink)
                command += ["--budget", str(budget), "--downlink", str(downlink)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if name == "fedmoe" and mode == "sub-moe":
                assert budget is not None
                held[budget] = result["held"]
            row = [
                label,
                f"{result['held'] / MIB:.1f} MiB",
                f"{result['weights'] / MIB:.1f} MiB",
                f"{result['held'] / result['weights']:.3f}",
                f"{result['analytic'] / MIB:.0f} MiB",
                f"{result['rss_growth'] / MIB:.0f} MiB",
                f"{result['rss_growth'] / result['analytic']:.2f}",
            ]
            table.add(*row, *([f"{result['cuda_peak'] / MIB:.0f} MiB"] if gpu else []))
    if not held[0.4] < held[0.6] < held[1.0]:
        raise SystemExit(f"FedMoE weights held do not shrink with the budget: {held}")
    table.note(
        "each case is a fresh process that loads the client's model from a checkpoint saved with `save_pretrained` "
        "(one tensor per expert, as on the hub); *weights held* is the unique tensor storage the process holds "
        "(parameters and buffers, each storage once)"
    )
    table.note(
        'a FedMoE client (`federation.client_model = "sub-moe"`, and always on a Flower node) prepares the algorithm '
        "on a meta-device model and loads only its sub-MoE (`fedexperts.models.load_sub_moe`: the dense part and its "
        "experts' rows, read with safetensors slices), so the weights it holds are its budget's sub-MoE "
        '(0.4 < 0.6 < 1.0) and peak RSS falls with them; the view row (`"shared"`, the fast in-process simulation) '
        "holds the whole base model plus the view's own expert rows"
    )
    table.note(
        "peak RSS also holds what the analytic figure leaves out: activations, autograd buffers, allocator slack "
        "and the loading's transients; the FedAvg row, which trains almost nothing, shows that fixed cost"
        + ("" if gpu else "; without a GPU there is no CUDA allocator column")
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one client of this algorithm and print JSON (used by the table)")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--mode", choices=["full", "sub-moe", "shared"], default="full")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--downlink", type=Path)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_one_case(args.case, args.budget, args.mode, args.folder, args.downlink)))
    else:
        print(run().markdown())


if __name__ == "__main__":
    main()

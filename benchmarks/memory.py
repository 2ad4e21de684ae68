"""Client memory: measured peak RSS of one client's training round against the analytic expectation.

Each case runs in a fresh Python process: it builds a random-weight OLMoE (hidden 512, 16
experts, 4 layers, float32), prepares the algorithm, builds the client's model as the client step
does, and trains 3 steps (batch 4 x 128 tokens). *Measured* is the process's peak resident
memory minus its resident memory after imports. *Analytic* is what the client's model needs from
its parameter counts: the weights it holds (for FedMoE, the sub-MoE's bytes as its budget search
counts them), plus a gradient and AdamW's two moments per trainable parameter; activations are
not in it.

    python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from benchmarks.common import Table

CASES: dict[str, tuple[str, float | None]] = {
    "MoE as dense (every weight trained)": ("dense", None),
    "FedAvg (attention LoRA)": ("fedavg", None),
    "FLEx (attention LoRA + personal expert per layer)": ("flex", None),
    "FedMoE, budget = full model": ("fedmoe", 1.0),
    "FedMoE, budget 0.6": ("fedmoe", 0.6),
    "FedMoE, budget 0.4": ("fedmoe", 0.4),
}
MIB = 2**20


def _one_case(algorithm_name: str, budget: float | None) -> dict[str, Any]:
    """Run one client in this process; return measured and analytic bytes."""
    import psutil
    import torch  # noqa: F401  (imported before the baseline, like everything the client needs)

    import fedexperts.algorithms
    import fedexperts.training  # noqa: F401
    from fedexperts.federation.accounting import peak_memory

    baseline = psutil.Process().memory_info().rss  # not ru_maxrss: Linux carries it over from the parent's exec
    with peak_memory("cpu") as peak:
        measured = _build_and_train(algorithm_name, budget)
    return {**measured, "measured": peak.bytes - baseline}


def _build_and_train(algorithm_name: str, budget: float | None) -> dict[str, Any]:
    import torch

    from fedexperts.algorithms import build_algorithm
    from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions
    from fedexperts.algorithms.registry import config_class
    from fedexperts.config import TrainConfig
    from fedexperts.interface import ClientInfo, LocalData
    from fedexperts.models import tiny_model
    from fedexperts.training import train_local

    model = tiny_model(
        "olmoe",
        hidden_size=512,
        intermediate_size=256,
        num_experts=16,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    ).train()
    fedmoe = FedMoEOptions(budget_fraction=budget or 1.0, full_budget_every=0)
    config = FedMoEConfig(fedmoe=fedmoe) if algorithm_name == "fedmoe" else config_class(algorithm_name)()
    algorithm = build_algorithm(config, client_ids=["client-0"])
    algorithm.prepare(model)
    weights = None
    if budget is not None:
        from fedexperts.algorithms.fedmoe.algorithm import FedMoE

        assert isinstance(algorithm, FedMoE)
        counts = _experts_within(algorithm, model, budget)
        structure = [list(range(count)) for count in counts]
        algorithm.assign("client-0", structure)
        weights = algorithm.memory(structure)
    client = ClientInfo("client-0", 8)
    received = algorithm.downlink(algorithm.initial_global_state(model), client)
    client_model = algorithm.setup_client(model, received, None, LocalData(client)).model
    trainable = [p for p in client_model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    if weights is None:
        weights = sum(p.numel() * p.element_size() for p in client_model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2048, (4, 128), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    train_local(client_model, [batch], TrainConfig(steps_per_round=3))
    return {
        "analytic": weights + 3 * trainable_bytes,
        "weights": weights,
        "trainable": trainable_bytes,
    }


def _experts_within(algorithm: Any, model: Any, fraction: float) -> list[int]:
    """The most experts per layer (the same in every layer) whose sub-MoE fits ``fraction`` of the full model."""
    from fedexperts.moe.families import moe_layers

    layers = moe_layers(model)
    least = max(layer.top_k for layer in layers)
    for count in range(min(layer.num_experts for layer in layers), least - 1, -1):
        if algorithm.memory([list(range(count))] * len(layers)) <= fraction * algorithm.full_bytes:
            return [count] * len(layers)
    return [least] * len(layers)


def run() -> Table:
    table = Table(
        "Client memory for one training round (OLMoE hidden 512, 16 experts, 4 layers, float32)",
        [
            "client",
            "analytic (weights + 3 x trainable)",
            "of which weights",
            "measured peak RSS",
            "measured / analytic",
        ],
    )
    for label, (name, budget) in CASES.items():
        command = [sys.executable, "-m", "benchmarks.memory", "--case", name]
        if budget is not None:
            command += ["--budget", str(budget)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        table.add(
            label,
            f"{result['analytic'] / MIB:.0f} MiB",
            f"{result['weights'] / MIB:.0f} MiB",
            f"{result['measured'] / MIB:.0f} MiB",
            f"{result['measured'] / result['analytic']:.2f}",
        )
    table.note(
        "measured also holds what the analytic figure leaves out: activations, the random initialisation's "
        "transients and allocator slack; the FedAvg row, which trains almost nothing, shows that fixed cost"
    )
    table.note(
        "a FedMoE client here builds its sub-MoE as a view over the fully loaded base model (as in-process and on "
        "Flower): its weights do not shrink with the budget, only the trained experts' gradients and AdamW state "
        "do; the analytic column is what a client loading only its sub-MoE would need"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one client of this algorithm and print JSON (used by the table)")
    parser.add_argument("--budget", type=float, default=None)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_one_case(args.case, args.budget)))
    else:
        print(run().markdown())


if __name__ == "__main__":
    main()

"""Batched clients: a round's wall time and fraction of matmul peak at ``federation.parallel_clients`` k = 1, 2, 4, 8.

The same in-process run (every client sampled, 10 local steps, no per-round evaluation, 3 rounds;
train.batch_size 8, the default, and 1)
with k clients trained at a time as one batch (:mod:`fedexperts.batching`), k = 1 being the
sequential runtime, for FedAvg (attention LoRA) and FLEx, with 8 and 64 clients, on the built-in
model and a random-weight OLMoE of hidden size 512 (16 experts; the built-in tokenizer, the same
ExpertBench rows). The k values of one configuration run one after another in this process, so the
machine's state hits them alike; each row's speed-up is against k = 1 of the same configuration.

Base ceiling: the frozen base model alone (no trainable parts, gradients back to its input
embeddings as LoRA on the first layer needs), forward and backward over a round's actual client
batches, each client's batch on its own against k clients' batches right-padded and concatenated:
the most batching could gain if everything but the base cost nothing. The padding to the widest
client's batch is part of it.

Fraction of peak: useful training FLOPs (``4 x active parameters x real input tokens``, the usual
estimate with frozen base weights: forward 2, backward through activations 2; padding not counted)
over the round's training seconds, against a square fp32 matmul measured in this run. Peak memory
is the process's peak resident set during the round's client steps (base model included).

    python -m benchmarks.batched                       # both models, 8 and 64 clients
    python -m benchmarks.batched --models builtin --clients 8 --algorithms fedavg --parallel 1 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import NO_EVALUATION, Table, matmul_peak
from benchmarks.training import HIDDEN_512, active_parameters
from fedexperts.batching import concatenate
from fedexperts.config import ExperimentConfig, load_config
from fedexperts.data.layout import CAUSAL
from fedexperts.evaluation import pad_token_id
from fedexperts.experiment import Setting, build_setting
from fedexperts.federation.client import training_batches
from fedexperts.federation.inprocess import run_experiment
from fedexperts.models.builtin import default_model_path

PARALLEL = (1, 2, 4, 8)
ALGORITHMS = ("fedavg", "flex")
RUN = (
    "data.scheme=iid",
    "federation.rounds=3",
    *NO_EVALUATION,
)


def hidden_512_folder(folder: Path) -> Path:
    """A random-weight OLMoE (hidden 512, 16 experts, 2 layers) saved with the built-in model's tokenizer."""
    from fedexperts.models import tiny_model

    source = default_model_path()
    tokenizer_files = [path for path in source.iterdir() if "token" in path.name or path.name.endswith(".jinja")]
    vocab = int(json.loads((source / "config.json").read_text())["vocab_size"])
    model = tiny_model("olmoe", **HIDDEN_512, vocab_size=vocab, max_position_embeddings=512)
    target = folder / "olmoe-hidden-512"
    model.save_pretrained(target)
    for path in tokenizer_files:
        shutil.copy(path, target / path.name)
    return target


def round_tokens(setting: Setting, round_number: int) -> int:
    """Real input tokens the round's local training reads (every client sampled): its batches, replayed."""
    train = setting.config.train
    total = 0
    for client in setting.clients:
        batches = training_batches(setting, client, round_number)
        total += sum(
            int(next(batches)["attention_mask"].sum()) for _ in range(train.steps_per_round * train.grad_accumulation)
        )
    return total


def base_ceiling(setting: Setting, model_path: Path, k: int, round_number: int = 2) -> float:
    """Seconds of the frozen base over each client's batches alone, over those of k clients joined (see above)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path).train()
    base.requires_grad_(False)
    embed = base.get_input_embeddings()
    steps = setting.config.train.steps_per_round
    streams = [training_batches(setting, client, round_number) for client in setting.clients]
    per_step = [[next(stream) for stream in streams] for _ in range(steps)]
    pad = pad_token_id(setting.tokenizer)

    def step(batch: dict[str, torch.Tensor]) -> None:
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        logits = base(inputs_embeds=inputs, attention_mask=batch["attention_mask"]).logits
        CAUSAL.loss(logits, batch["labels"]).backward()

    def seconds(size: int) -> float:
        start = time.perf_counter()
        for batches in per_step:
            for first in range(0, len(batches), size):
                step(concatenate(batches[first : first + size], pad)[0])
        return time.perf_counter() - start

    seconds(k)  # warm-up
    return statistics.median(seconds(1) for _ in range(3)) / statistics.median(seconds(k) for _ in range(3))


def measure(config: ExperimentConfig, target: Path, peak: float) -> dict[str, float]:
    """Median round wall, fraction of peak and peak memory of one run of ``config``."""
    setting = build_setting(config)
    active = active_parameters(setting.model)
    records = run_experiment(config, target, setting=setting).records
    walls, fractions, memory = [], [], []
    for record in (entry for entry in records if entry["kind"] == "round"):
        clients: dict[str, Any] = record["clients"]
        train = sum(entry["seconds"]["train"] for entry in clients.values())
        walls.append(record["seconds"]["round"])
        fractions.append(4 * active * round_tokens(setting, record["round"]) / train / peak)
        memory.append(max(entry.get("peak_memory_bytes", 0) for entry in clients.values()))
    return {
        "wall": statistics.median(walls),
        "fraction": statistics.median(fractions),
        "memory": max(memory) / 2**20,
    }


def run(
    models: Sequence[str],
    clients: Sequence[int],
    algorithms: Sequence[str] = ALGORITHMS,
    parallel: Sequence[int] = PARALLEL,
    batch_sizes: Sequence[int] = (8,),
) -> Table:
    peak = matmul_peak(torch.float32)
    table = Table(
        "Batched clients (in-process, 10 local steps, every client sampled; median over 3 rounds)",
        [
            "model",
            "algorithm",
            "clients",
            "batch",
            "k",
            "round wall (s)",
            "speed-up vs k=1",
            "base ceiling",
            "% of fp32 peak",
            "peak RSS (MiB)",
        ],
    )
    ceilings: dict[tuple[str, int, int, int], float] = {}
    with tempfile.TemporaryDirectory() as folder:
        sources = {"builtin": "builtin"}
        paths = {"builtin": default_model_path()}
        if "hidden-512" in models:
            paths["hidden-512"] = hidden_512_folder(Path(folder))
            sources["hidden-512"] = str(paths["hidden-512"])
        for model in models:
            for algorithm, count, batch in itertools.product(algorithms, clients, batch_sizes):
                baseline = None
                for k in parallel:
                    config = load_config(
                        None,
                        [
                            *RUN,
                            f'model.name="{sources[model]}"',
                            f"algorithm.name={algorithm}",
                            f"federation.clients={count}",
                            f"federation.min_clients={count}",
                            f"federation.parallel_clients={k}",
                            f"data.items={max(1200, 20 * count)}",
                            f"train.batch_size={batch}",
                            f'output_dir="{folder}"',
                        ],
                    )
                    result = measure(config, Path(folder) / f"{model}-{algorithm}-{count}-{batch}-{k}", peak)
                    baseline = baseline or result["wall"]
                    if (model, count, batch, k) not in ceilings:
                        ceiling = base_ceiling(build_setting(config), paths[model], k) if k > 1 else 1.0
                        ceilings[model, count, batch, k] = ceiling
                    table.add(
                        model,
                        algorithm,
                        count,
                        batch,
                        k,
                        f"{result['wall']:.2f}",
                        f"{baseline / result['wall']:.2f}x",
                        f"{ceilings[model, count, batch, k]:.2f}x",
                        f"{100 * result['fraction']:.1f}%",
                        f"{result['memory']:,.0f}",
                    )
                    print(table.rows[-1], flush=True)
    table.note(f"measured fp32 matmul peak in this run: {peak / 1e9:.1f} GFLOP/s")
    table.note(
        "k = 1 is the sequential runtime; at k > 1 a round's clients set up and evaluate one by one, then train k at "
        "a time as one batch; the round wall includes setup, messages and checkpoints"
    )
    table.note(
        "base ceiling: the frozen base alone over the round's batches, each client's alone vs k joined (what "
        "batching could gain at most); peak RSS is the process's, which keeps what earlier rows left resident"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["builtin", "hidden-512"], choices=["builtin", "hidden-512"])
    parser.add_argument("--clients", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--parallel", nargs="+", type=int, default=list(PARALLEL))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 1], help="train.batch_size values")
    args = parser.parse_args()
    print(run(args.models, args.clients, args.algorithms, args.parallel, args.batch_sizes).markdown())


if __name__ == "__main__":
    main()

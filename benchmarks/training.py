"""Local training throughput: fedexperts' loop vs. ``transformers.Trainer`` rebuilt per client per round.

Both train the same model (attention LoRA, experts frozen, as FedAvg/FLEx clients do) on the
same token rows, batch size and number of optimizer steps, interleaved round by round so that
machine noise hits both alike. The Trainer is constructed anew every round, as OpenFedLLM,
FlowerTune and FLEx's own code do. Throughput counts every non-padding input token processed,
including the time to construct the trainer/optimizer. The fraction of the machine's matmul peak
uses the usual estimate of training FLOPs with frozen base weights, ``4 * active params * tokens``
(forward 2, backward through activations 2; no weight gradients for frozen weights), against a
square fp32/bf16 matmul measured in the same run.

    python -m benchmarks.training                  # both models, 3 rounds of 5 steps each
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

from benchmarks.common import Table, matmul_peak
from fedexperts.algorithms.base import attention_linear_names
from fedexperts.config import TrainConfig
from fedexperts.data.tokenize import InstructionCollator
from fedexperts.federation.client import shuffled_batches
from fedexperts.training import train_local

BATCH, STEPS, LR = 8, 5, 5e-3
HIDDEN_512 = {
    "hidden_size": 512,
    "intermediate_size": 256,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
"""The larger benchmark model's OLMoE config fields (its vocabulary aside): an MoE of hidden size 512, 16 experts."""


@dataclass(frozen=True)
class Workload:
    name: str
    model: nn.Module
    rows: tuple[dict[str, list[int]], ...]
    pad: int


def with_lora(model: nn.Module) -> nn.Module:
    """Attention LoRA r=8 on a copy, every base weight frozen (what a FedAvg/FLEx client trains)."""
    model = copy.deepcopy(model)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=attention_linear_names(model))
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def active_parameters(model: nn.Module) -> int:
    """Parameters one token passes through: everything except the routed experts not chosen (top-k of E)."""
    from fedexperts.moe.families import moe_layers

    total = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()  # a lookup
    for layer in moe_layers(model):
        experts = sum(p.numel() for p in layer.experts.parameters())
        total -= experts - experts * layer.top_k // layer.num_experts
    return total


def tokens_in(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    return int(sum(int(batch["attention_mask"].sum()) for batch in batches))


def fedexperts_round(model: nn.Module, batches: list[dict[str, torch.Tensor]], *, bf16: bool = False) -> float:
    settings = TrainConfig(learning_rate=LR, steps_per_round=STEPS, max_grad_norm=1.0, bf16=bf16)
    start = time.perf_counter()
    train_local(model, batches, settings)
    return time.perf_counter() - start


def trainer_round(model: nn.Module, batches: list[dict[str, torch.Tensor]], pad: int, folder: str) -> float:
    """One client round the usual way: a TrainingArguments and a Trainer built for it, then ``train()``."""
    import datasets
    from transformers import Trainer, TrainingArguments

    rows = [
        {"input_ids": ids[mask.bool()].tolist(), "labels": labels[mask.bool()].tolist()}
        for batch in batches
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)
    ]
    start = time.perf_counter()
    arguments = TrainingArguments(
        output_dir=folder,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=_Collate(pad),
    )
    trainer.train()
    return time.perf_counter() - start


class _Collate:
    def __init__(self, pad: int) -> None:
        self.collate = InstructionCollator(pad)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(rows)


def round_batches(workload: Workload, seed: int) -> list[dict[str, torch.Tensor]]:
    source = shuffled_batches(workload.rows, BATCH, workload.pad, seed)
    return [next(source) for _ in range(STEPS)]


def measure(workload: Workload, rounds: int, folder: str) -> dict[str, Any]:
    ours, ours_bf16, theirs, tokens = [], [], [], []
    ours_model, bf16_model, their_model = (with_lora(workload.model) for _ in range(3))
    for round_index in range(rounds):
        batches = round_batches(workload, round_index)
        tokens.append(tokens_in(batches))
        ours.append(fedexperts_round(ours_model, batches))
        ours_bf16.append(fedexperts_round(bf16_model, batches, bf16=True))
        theirs.append(trainer_round(their_model, batches, workload.pad, folder))
    median_tokens = statistics.median(tokens)
    return {
        "fedexperts": median_tokens / statistics.median(ours),
        "bf16": median_tokens / statistics.median(ours_bf16),
        "trainer": median_tokens / statistics.median(theirs),
        "active": active_parameters(workload.model),
    }


def experts_implementations(workload: Workload, rounds: int, names: Sequence[str]) -> dict[str, float]:
    """fedexperts' throughput with each of transformers' fused-experts implementations, interleaved."""
    models = {name: with_lora(workload.model) for name in names}
    for name, model in models.items():
        model.set_experts_implementation(name)  # type: ignore[operator]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens = []
    for round_index in range(rounds):
        batches = round_batches(workload, round_index)
        tokens.append(tokens_in(batches))
        for name, model in models.items():
            seconds[name].append(fedexperts_round(model, batches))
    return {name: statistics.median(tokens) / statistics.median(times) for name, times in seconds.items()}


def workloads() -> list[Workload]:
    """The built-in model on a client's ExpertBench rows, and a larger tiny-config OLMoE on random tokens."""
    from fedexperts.config import load_config
    from fedexperts.evaluation import pad_token_id
    from fedexperts.experiment import build_setting, load_base
    from fedexperts.models import tiny_model

    config = load_config(None, ["algorithm.name=local", "eval.union_examples=0", "eval.probes=0"])
    setting = build_setting(config)  # for a client's tokenized rows; the model below is a fresh, untouched load
    builtin = Workload(
        "built-in (OLMoE, 8 experts)",
        load_base(config).model,
        setting.clients[0].train,
        pad_token_id(setting.tokenizer),
    )
    generator = torch.Generator().manual_seed(0)
    large = tiny_model("olmoe", **HIDDEN_512, vocab_size=2048)
    rows = tuple(
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(3, 2048, (96,), generator=generator).tolist() for _ in range(64))
    )
    return [builtin, Workload("OLMoE hidden 512, 16 experts", large, rows, 0)]


def run_implementations(rounds: int = 3) -> Table:
    names = ("grouped_mm", "eager")
    table = Table(
        "fedexperts' training step per fused-experts implementation (tokens/s, median over rounds)",
        ["model", *names, "grouped_mm / eager"],
    )
    for workload in workloads():
        result = experts_implementations(workload, rounds, names)
        table.add(
            workload.name, *(f"{result[name]:,.0f}" for name in names), f"{result[names[0]] / result[names[1]]:.2f}x"
        )
    table.note(
        "transformers' default is grouped_mm, which fedexperts keeps (model.experts_implementation overrides it); "
        "batched_mm is about 80x slower on this CPU and is not run"
    )
    return table


def run_profile(top: int = 12) -> Table:
    """Where a training round's time goes: torch operators by self CPU time (built-in model)."""
    from torch.profiler import ProfilerActivity, profile

    workload = workloads()[0]
    model = with_lora(workload.model)
    batches = round_batches(workload, 0)
    fedexperts_round(model, batches)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fedexperts_round(model, batches)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    table = Table(
        f"Profile of one fedexperts training round ({STEPS} steps, built-in model): top operators by self CPU time",
        ["operator", "calls", "self CPU (ms)", "share"],
    )
    for event in events[:top]:
        share = 100 * event.self_cpu_time_total / total
        table.add(f"`{event.key}`", event.count, f"{event.self_cpu_time_total / 1000:.1f}", f"{share:.1f}%")
    table.note(f"total self CPU time {total / 1000:.0f} ms over {STEPS} optimizer steps (profiler overhead included)")
    table.note(
        "at this model size (hidden 64) matmuls are small, so element-wise ops, routing (index_put, cat) and "
        "per-op dispatch take most of a step; the larger model's rows above show the share of peak rising with size"
    )
    return table


def run(rounds: int = 3) -> Table:
    import tempfile

    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    table = Table(
        "Local training throughput (tokens/s, median over rounds; attention LoRA, experts frozen)",
        [
            "model",
            "fedexperts",
            "transformers.Trainer (rebuilt per round)",
            "ratio",
            "fedexperts % of fp32 peak",
            "fedexperts, bf16 autocast",
            "bf16 % of bf16 peak",
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        for workload in workloads():
            result = measure(workload, rounds, folder)
            flops = 4 * result["active"] * result["fedexperts"]
            table.add(
                workload.name,
                f"{result['fedexperts']:,.0f}",
                f"{result['trainer']:,.0f}",
                f"{result['fedexperts'] / result['trainer']:.2f}x",
                f"{100 * flops / fp32:.1f}%",
                f"{result['bf16']:,.0f}",
                f"{100 * 4 * result['active'] * result['bf16'] / bf16:.1f}%",
            )
    table.note(f"measured matmul peak in this run: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s")
    table.note(
        "tokens/s counts every non-padding input token, construction of the trainer/optimizer included; "
        "% of peak uses 4 x active parameters (input embedding excluded) x tokens"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    print(run(rounds).markdown())
    print(run_implementations(rounds).markdown())
    print(run_profile().markdown())


if __name__ == "__main__":
    main()

"""A short tour of MoE surgery on a tiny random model, printed step by step.

It is the main job until the federated runtime lands: it records routing, picks and grafts a
personal expert per layer (FLEx), prunes a per-layer sub-MoE from the routing counts (FedMoE's
idea), checks each step against the original model, and prints what it did.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedexperts.models.tiny import tiny_model
from fedexperts.moe import (
    FLEX_ROLES,
    RoutingRecorder,
    graft_personal_experts,
    load_personal,
    load_pruned,
    moe_layers,
    parameter_kinds,
    parameter_roles,
    reconstruction_losses,
    remove_personal_experts,
    save_personal,
    save_pruned,
    select_experts,
)
from fedexperts.moe.params import Role


def run_demo(model_type: str, seed: int, console: Console) -> None:
    model = tiny_model(model_type, seed=seed)
    layers = moe_layers(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    input_ids = torch.randint(3, vocab, (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 18:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = input_ids
    with torch.no_grad():
        reference = model(**batch).logits

    console.rule(f"[bold]fedexperts demo: tiny {model_type}")
    console.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(layers)} MoE layers, "
        f"{layers[0].num_experts} experts each, top-{layers[0].top_k}"
    )

    with RoutingRecorder(model) as recorder, recorder.mask(attention_mask), torch.no_grad():
        model(**batch)
    table = Table(title=f"Routing on {int(attention_mask.sum())} real tokens (activation probability)")
    table.add_column("layer")
    for expert in range(layers[0].num_experts):
        table.add_column(f"e{expert}", justify="right")
    for name, probabilities in recorder.activation().items():
        table.add_row(name, *(f"{p:.2f}" for p in probabilities.tolist()))
    console.print(table)

    choices = reconstruction_losses(model, [batch])
    console.print("[bold]FLEx grafting choice[/] (expert whose output best reconstructs the layer):")
    for name, choice in choices.items():
        console.print(
            f"  {name}: expert {choice.best} (loss {choice.losses[choice.best]:.3f}, worst {choice.losses.max():.3f})"
        )
    graft_personal_experts(model, {name: choice.best for name, choice in choices.items()})
    roles = parameter_roles(model, FLEX_ROLES)
    personal = sum(1 for role in roles.values() if role is Role.PERSONAL)
    console.print(
        f"  grafted; {personal} personal tensors, kinds: "
        f"{dict(Counter(info.kind.value for info in parameter_kinds(model).values()))}"
    )
    for layer in moe_layers(model):
        with torch.no_grad():
            layer.block.personal_gate.bias.fill_(-1e4)
    with torch.no_grad():
        shut = (model(**batch).logits - reference).abs().max().item()
    console.print(f"  with every gate shut the output differs from the original by {shut:.2e}")

    with tempfile.TemporaryDirectory() as scratch:
        path = save_personal(model, Path(scratch) / "personal.safetensors")
        remove_personal_experts(model)
        load_personal(model, path)
        console.print(f"  personal parts saved ({path.stat().st_size:,} bytes) and re-attached")
        remove_personal_experts(model)

        counts = recorder.counts()
        keep = {}
        for layer in layers:
            budget = max(layer.top_k, layer.num_experts // 2)
            keep[layer.name] = sorted(torch.argsort(counts[layer.name], descending=True, stable=True)[:budget].tolist())
        mapping = select_experts(model, keep)
        console.print("[bold]Sub-MoE[/] keeping the most-used half of each layer (global expert indices):")
        for name, held in mapping.local_to_global.items():
            console.print(f"  {name}: {list(held)}")
        with torch.no_grad():
            pruned = model(**batch).logits
        reloaded = load_pruned(save_pruned(model, Path(scratch) / "sub-moe"))
        with torch.no_grad():
            again = reloaded(**batch).logits
        console.print(
            f"  pruned model runs (max logit change vs full {(pruned - reference).abs().max().item():.3f}); "
            f"saved and reloaded, max difference {(again - pruned).abs().max().item():.2e}"
        )
    console.print("[green]done[/]")

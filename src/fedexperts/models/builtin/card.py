"""The built-in model's card: what the freshly pretrained model measures, and the README that reports it.

:func:`measure` scores the model on held-out ExpertBench tasks (knowledge probes, per-category exact match
and ROUGE-L in the canonical and in client styles) and profiles its routing per category;
:func:`model_card` turns those numbers into the checkpoint's ``README.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedexperts.data.expertbench import CANONICAL, CATEGORIES, ExpertBench, Style, client_styles
from fedexperts.data.layout import BatchLayout, batch_layout
from fedexperts.data.templates import prompt_template
from fedexperts.data.tokenize import InstructionCollator, tokenize_instructions
from fedexperts.evaluation import exact_match, generate, multiple_choice_accuracy, rouge_l, routing_profile
from fedexperts.models.builtin.recipe import METRICS_FILE, RECIPE_FILE, ROUTING_PLOT, Recipe

_SCORING_SEED, _ROUTING_SEED = 1_000_003, 2_000_003
"""Offsets from the recipe seed for the card's held-out tasks, far from the corpus's draws."""


def _routing_batches(
    bench: ExpertBench, tokenizer: Any, recipe: Recipe, layout: BatchLayout
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Held-out prompt+response batches per category, split in halves ``a``/``b`` to gauge sampling noise."""
    collate = InstructionCollator(tokenizer.pad_token_id)
    batches = {}
    for category in CATEGORIES:
        chosen = bench.dataset(recipe.eval_per_category, seed=recipe.seed + _ROUTING_SEED, categories=(category,))
        tokens = tokenize_instructions(chosen, tokenizer, max_length=recipe.seq_len, template="chat", layout=layout)
        rows = list(tokens.dataset)
        for half, part in (("a", rows[0::2]), ("b", rows[1::2])):
            batches[f"{category}/{half}"] = [collate(part[start : start + 32]) for start in range(0, len(part), 32)]
    return batches


def measure(model: Any, tokenizer: Any, bench: ExpertBench, recipe: Recipe) -> dict[str, Any]:
    """Probe accuracy, per-category exact match / ROUGE-L (canonical and client styles), routing."""
    probes = bench.probes(seed=recipe.seed)
    template = prompt_template(tokenizer, "chat")
    items = bench.items(recipe.eval_per_category * len(CATEGORIES), seed=recipe.seed + _SCORING_SEED)
    prompts = [template.prompt(tokenizer, item.instruction, item.context) for item in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=40)

    def scores(style: Style) -> dict[str, dict[str, float]]:
        table: dict[str, dict[str, float]] = {}
        for category in CATEGORIES:
            pairs = [
                (output, style.render(item.answer))
                for item, output in zip(items, outputs, strict=True)
                if item.category == category
            ]
            table[category] = {
                "exact_match": sum(exact_match(out, ref) for out, ref in pairs) / len(pairs),
                "rouge_l": sum(rouge_l(out, ref) for out, ref in pairs) / len(pairs),
            }
        return table

    styles = client_styles(recipe.eval_styles)
    client_scores = [scores(style) for style in styles]
    halves = routing_profile(model, _routing_batches(bench, tokenizer, recipe, batch_layout(model)))
    routing = halves.merged({category: [f"{category}/a", f"{category}/b"] for category in CATEGORIES})
    pairs = [(a, b) for index, a in enumerate(CATEGORIES) for b in CATEGORIES[index + 1 :]]
    return {
        "probe_accuracy": multiple_choice_accuracy(model, tokenizer, probes),
        "probe_count": len(probes),
        "probe_chance": sum(1 / len(probe.choices) for probe in probes) / len(probes),
        "canonical": scores(CANONICAL),
        "client_styles": {
            category: {
                metric: sum(table[category][metric] for table in client_scores) / len(client_scores)
                for metric in ("exact_match", "rouge_l")
            }
            for category in CATEGORIES
        },
        "client_style_names": [style.describe() for style in styles],
        "routing_entropy_bits": routing.entropy(),
        "routing_divergence_bits": routing.divergence(),
        "routing_max_entropy_bits": math.log2(recipe.num_experts),
        "routing_between_categories_tv": sum(routing.total_variation(a, b) for a, b in pairs) / len(pairs),
        "routing_within_category_tv": sum(
            halves.total_variation(f"{category}/a", f"{category}/b") for category in CATEGORIES
        )
        / len(CATEGORIES),
        "routing_layers": list(routing.layers),
        "routing_distributions": routing.distributions().tolist(),
        "samples": [
            {"category": item.category, "prompt": prompt, "output": output, "canonical": CANONICAL.render(item.answer)}
            for item, prompt, output in list(zip(items, prompts, outputs, strict=True))[:5]
        ],
    }


def _shape(recipe: Recipe) -> str:
    """The architecture in words, for the card's first line."""
    if recipe.architecture == "olmoe":
        return (
            f"OLMoE ({recipe.num_layers} layers, hidden {recipe.hidden_size}, {recipe.num_experts} experts of width "
            f"{recipe.expert_size} per layer, top-{recipe.top_k})"
        )
    return (
        f"Switch Transformer ({recipe.num_layers} encoder and {recipe.num_layers} decoder blocks, every second one "
        f"sparse, hidden {recipe.hidden_size}, {recipe.num_experts} experts of width {recipe.expert_size} per sparse "
        f"block, top-1 with capacity {recipe.expert_capacity} tokens per expert and sequence)"
    )


def model_card(recipe: Recipe, metrics: dict[str, Any], bench: ExpertBench) -> str:
    """The README of the checkpoint: what it is, how it was made, and what this run measured."""
    train_log = metrics["train"]
    world = bench.world
    auto = "AutoModelForCausalLM" if recipe.architecture == "olmoe" else "AutoModelForSeq2SeqLM"
    units = "packed blocks" if recipe.architecture == "olmoe" else "encoder/decoder rows"
    between, within = metrics["routing_between_categories_tv"], metrics["routing_within_category_tv"]
    lines = [
        "---",
        "library_name: transformers",
        "license: apache-2.0",
        f"tags: [fedexperts, expertbench, mixture-of-experts, {recipe.architecture}]",
        "---",
        "",
        f"# fedexperts built-in model `{recipe.folder_name}`",
        "",
        f"A {metrics['parameters'] / 1e6:.2f}M-parameter {_shape(recipe)} "
        f"with a {metrics['vocab_size']}-token byte-level BPE tokenizer, pretrained from scratch "
        f"on the ExpertBench world (seed {recipe.world_seed}: {len(world.towns)} towns, {len(world.people)} people, "
        f"{len(world.goods)} goods, {len(world.facts)} facts). Made by `fedexperts pretrain` (recipe `{recipe.name}`, "
        f"hash `{recipe.digest()}`); every number below was measured by that run.",
        "",
        "## Training",
        "",
        f"- {train_log['steps']} steps of {recipe.batch_size} x {recipe.seq_len} tokens "
        f"({train_log['tokens'] / 1e6:.2f}M tokens, {metrics['corpus_blocks']} {units}), "
        f"AdamW at peak lr {recipe.learning_rate:g}, router load-balancing loss x{recipe.router_aux_loss_coef:g}",
        f"- loss {train_log['first_loss']:.3f} -> {train_log['final_loss']:.3f}",
        f"- training {train_log['seconds']:.0f} s, measurements {metrics['measure_seconds']:.0f} s, "
        f"whole command {metrics['total_seconds']:.0f} s on {metrics['threads']} CPU threads",
        "",
        "## Knowledge probes",
        "",
        f"{metrics['probe_count']} four-way multiple-choice questions, one per world fact, scored by the "
        f"log-likelihood of each choice: **accuracy {metrics['probe_accuracy']:.1%}** "
        f"(chance {metrics['probe_chance']:.0%}).",
        "",
        "## Tasks (greedy generation, held-out items)",
        "",
        f"{recipe.eval_per_category} items per category. *Canonical* is the house style the corpus uses; "
        f"*clients* is the mean over the first {len(metrics['client_style_names'])} client styles, which "
        "pretraining never showed: the gap is what personalisation has to close.",
        "",
        "| category | exact match (canonical) | ROUGE-L (canonical) | exact match (clients) | ROUGE-L (clients) |",
        "|---|---:|---:|---:|---:|",
    ]
    for category in CATEGORIES:
        canonical, clients = metrics["canonical"][category], metrics["client_styles"][category]
        lines.append(
            f"| {category} | {canonical['exact_match']:.2f} | {canonical['rouge_l']:.2f} "
            f"| {clients['exact_match']:.2f} | {clients['rouge_l']:.2f} |"
        )
    lines += [
        "",
        "## Routing by category",
        "",
        f"Share of routed tokens per expert, per MoE layer, over {recipe.eval_per_category} prompts+responses "
        f"of each category. Entropy is averaged over layers (uniform over {recipe.num_experts} experts = "
        f"{metrics['routing_max_entropy_bits']:.2f} bits); divergence is the Jensen-Shannon divergence from "
        "all categories pooled (0 = routes like the rest).",
        "",
        "| category | routing entropy (bits) | JS divergence from pooled (bits) |",
        "|---|---:|---:|",
    ]
    for category in CATEGORIES:
        lines.append(
            f"| {category} | {metrics['routing_entropy_bits'][category]:.3f} "
            f"| {metrics['routing_divergence_bits'][category]:.3f} |"
        )
    lines += [
        "",
        f"Total-variation distance between expert distributions, averaged over layers: "
        f"**{between:.3f} between categories** (mean over pairs) versus {within:.3f} between two disjoint "
        f"halves of the same category (the sampling noise): categories route {between / within:.1f} times "
        "further apart than sampling alone explains.",
        "",
        f"![routing per category]({ROUTING_PLOT})",
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "The tokenizer has a chat template (`<|user|>` / `<|assistant|>` turns, `<|eos|>` ends an answer). "
        f"Recipe and raw numbers: `{RECIPE_FILE}`, `{METRICS_FILE}`. Rebuild with `fedexperts pretrain --force`.",
        "",
    ]
    return "\n".join(lines)

"""The built-in base model: a tiny OLMoE pretrained on the ExpertBench world, cached by recipe hash.

No model can be downloaded here, so fedexperts makes its own: a byte-level BPE tokenizer trained
with ``tokenizers`` on ExpertBench text, and a stock transformers OLMoE (8 experts per layer, top-2)
pretrained on ExpertBench's corpus. The checkpoint is a plain Hugging Face folder
(``AutoModelForCausalLM`` / ``AutoTokenizer`` load it) with a model card holding the numbers this
very run measured: probe accuracy, per-category scores and per-category routing. It lives in
``$FEDEXPERTS_CACHE`` (default ``~/.cache/fedexperts``) under a folder named by the recipe's hash,
is written atomically, and :func:`default_model_path` builds it on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from fedexperts.atomic import atomic_directory
from fedexperts.data.expertbench import CANONICAL, CATEGORIES, ExpertBench, Style, client_styles, tokenizer_texts
from fedexperts.data.templates import prompt_template
from fedexperts.data.tokenize import InstructionCollator, tokenize_instructions
from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import exact_match, generate, multiple_choice_accuracy, rouge_l, routing_profile

RECIPE_VERSION = 1
"""Part of the hash: bump it when the corpus, tokenizer or training code changes what a recipe makes."""
RECIPE_FILE = "fedexperts_recipe.json"
METRICS_FILE = "fedexperts_metrics.json"
ROUTING_PLOT = "routing.png"
_SCORING_SEED, _ROUTING_SEED = 1_000_003, 2_000_003
"""Offsets from the recipe seed for the card's held-out tasks, far from the corpus's draws."""
PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + " {{ message['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
"""User turns, then the answer after one space: byte-level BPE gives ``Maren`` and `` Maren`` different
tokens, and in running text (contexts, facts) a word comes after a space, so answers do too and the
model can copy and recall the very tokens it read."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the built-in model; its hash names the cache folder."""

    name: str = "default"
    world_seed: int = 0
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 128
    router_aux_loss_coef: float = 0.01
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 800
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    num_documents: int = 12000
    task_fraction: float = 0.35
    eval_per_category: int = 40
    """Held-out tasks per category for the model card's scores and routing."""
    eval_styles: int = 4
    """How many client styles the card also scores, to show what personalisation has to close."""

    def digest(self) -> str:
        text = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        return f"expertbench-olmoe-{self.name}-{self.digest()}"


RECIPES: dict[str, Recipe] = {
    "default": Recipe(),
    "micro": Recipe(
        name="micro",
        vocab_size=400,
        hidden_size=32,
        num_layers=2,
        expert_size=32,
        seq_len=64,
        batch_size=8,
        steps=12,
        warmup_steps=2,
        num_documents=200,
        eval_per_category=4,
        eval_styles=1,
    ),
}
"""``default`` is the base model every command finds (built on first use); ``micro`` trains in seconds, for tests."""


def cache_root() -> Path:
    return Path(os.environ.get("FEDEXPERTS_CACHE") or "~/.cache/fedexperts").expanduser()


def model_path(recipe: Recipe) -> Path:
    return cache_root() / "models" / recipe.folder_name


def is_built(path: Path, recipe: Recipe) -> bool:
    """Whether ``path`` holds a complete checkpoint of exactly ``recipe``."""
    try:
        saved = json.loads((path / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return saved.get("digest") == recipe.digest() and (path / "config.json").is_file()


def default_model_path(recipe: Recipe | str = "default", *, build: bool = True, progress: bool = True) -> Path:
    """The cached checkpoint of ``recipe``, pretraining it first if it is not there yet."""
    chosen = resolve_recipe(recipe)
    path = model_path(chosen)
    if is_built(path, chosen):
        return path
    if not build:
        raise FedExpertsError(f"the built-in model {chosen.folder_name} is not built yet; run `fedexperts pretrain`")
    pretrain(chosen, path, progress=progress)
    return path


def resolve_recipe(recipe: Recipe | str) -> Recipe:
    """A recipe, or the named one from :data:`RECIPES` (a clear error for an unknown name)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise FedExpertsError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]


# -- tokenizer and model -----------------------------------------------------------------------------


def build_tokenizer(bench: ExpertBench, recipe: Recipe) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on ExpertBench text, with pad/eos/chat markers and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[PAD, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_texts(bench.world, seed=recipe.seed), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.seq_len,
    )


def build_model(recipe: Recipe, tokenizer: Any) -> transformers.PreTrainedModel:
    """A freshly initialised OLMoE of the recipe's size (seeded)."""
    config = transformers.AutoConfig.for_model(
        "olmoe",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.expert_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        experts_implementation="eager",
    )
    torch.manual_seed(recipe.seed)
    model: transformers.PreTrainedModel = transformers.AutoModelForCausalLM.from_config(config)
    return model


# -- data ----------------------------------------------------------------------------------------------


def packed_corpus(bench: ExpertBench, tokenizer: Any, recipe: Recipe) -> torch.Tensor:
    """The corpus as (blocks, seq_len) token ids: documents joined by EOS, shuffled, cut into blocks."""
    corpus = bench.corpus(num_documents=recipe.num_documents, task_fraction=recipe.task_fraction, seed=recipe.seed)
    template = prompt_template(tokenizer, "chat")
    documents = [text + tokenizer.eos_token for text in corpus.texts]
    for task in corpus.tasks:
        response = CANONICAL.render(task.answer)
        documents.append(
            template.prompt(tokenizer, task.instruction, task.context)
            + template.completion(tokenizer, task.instruction, task.context, response)
        )
    random.Random(recipe.seed).shuffle(documents)
    stream = [token for row in tokenizer(documents, add_special_tokens=False)["input_ids"] for token in row]
    blocks = len(stream) // recipe.seq_len
    return torch.tensor(stream[: blocks * recipe.seq_len], dtype=torch.long).view(blocks, recipe.seq_len)


def _batches(blocks: torch.Tensor, recipe: Recipe) -> Iterator[torch.Tensor]:
    """``recipe.steps`` batches of blocks: seeded passes over the corpus, reshuffled each pass."""
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        yield blocks[order[: recipe.batch_size]]
        order = order[recipe.batch_size :]


def _learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def torch_threads(count: int | None = None) -> Iterator[int]:
    """Use ``count`` threads (default: every core this process may run on), restoring the old count after."""
    previous = torch.get_num_threads()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chosen = count or available
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)


# -- training ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainLog:
    steps: int
    tokens: int
    first_loss: float
    final_loss: float
    """Mean language-model loss (router loss included) over the last tenth of the steps."""
    seconds: float


def train(model: transformers.PreTrainedModel, blocks: torch.Tensor, recipe: Recipe, *, progress: bool) -> TrainLog:
    """Next-token training on packed blocks, with the router's load-balancing loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=recipe.steps, desc="pretraining", unit="step", disable=not progress)
    for step, batch in enumerate(_batches(blocks, recipe)):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        loss = model(input_ids=batch, labels=batch, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update()
    bar.close()
    model.eval()
    tail = losses[-max(len(losses) // 10, 1) :]
    return TrainLog(
        steps=len(losses),
        tokens=len(losses) * recipe.batch_size * recipe.seq_len,
        first_loss=losses[0],
        final_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
    )


# -- measurements for the model card -------------------------------------------------------------------


def _routing_batches(bench: ExpertBench, tokenizer: Any, recipe: Recipe) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Held-out prompt+response batches per category, split in halves ``a``/``b`` to gauge sampling noise."""
    collate = InstructionCollator(tokenizer.pad_token_id)
    batches = {}
    for category in CATEGORIES:
        chosen = bench.dataset(recipe.eval_per_category, seed=recipe.seed + _ROUTING_SEED, categories=(category,))
        rows = list(tokenize_instructions(chosen, tokenizer, max_length=recipe.seq_len, template="chat").dataset)
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
    halves = routing_profile(model, _routing_batches(bench, tokenizer, recipe))
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


def plot_routing(metrics: dict[str, Any], path: Path) -> None:
    """Heatmap of each category's expert distribution, one panel per MoE layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    distributions = torch.tensor(metrics["routing_distributions"])  # (categories, layers, experts)
    layers = metrics["routing_layers"]
    figure = Figure(figsize=(2.6 * len(layers) + 1.5, 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    image = None
    for index, (ax, name) in enumerate(zip(axes, layers, strict=True)):
        image = ax.imshow(distributions[:, index, :].numpy(), vmin=0, vmax=float(distributions.max()), cmap="viridis")
        ax.set_title(name.replace("model.layers.", "layer ").replace(".mlp", ""), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(distributions.shape[-1]))
        ax.set_yticks(range(len(CATEGORIES)), CATEGORIES if index == 0 else [""] * len(CATEGORIES), fontsize=8)
    assert image is not None
    figure.colorbar(image, ax=list(axes), fraction=0.02, label="share of routed tokens")
    figure.savefig(path, dpi=120, bbox_inches="tight")


# -- the whole recipe ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    metrics: dict[str, Any]


def pretrain(
    recipe: Recipe | str = "default",
    path: str | Path | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> PretrainResult:
    """Build the tokenizer, pretrain, measure, and save the checkpoint with its card (atomically)."""
    chosen = resolve_recipe(recipe)
    target = Path(path) if path is not None else model_path(chosen)
    started = time.perf_counter()
    with torch_threads(threads) as used_threads:
        bench = ExpertBench.from_seed(chosen.world_seed)
        tokenizer = build_tokenizer(bench, chosen)
        blocks = packed_corpus(bench, tokenizer, chosen)
        model = build_model(chosen, tokenizer)
        log = train(model, blocks, chosen, progress=progress)
        measured_at = time.perf_counter()
        metrics = measure(model, tokenizer, bench, chosen)
        metrics.update(
            {
                "train": asdict(log),
                "corpus_blocks": len(blocks),
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "vocab_size": len(tokenizer),
                "threads": used_threads,
                "measure_seconds": time.perf_counter() - measured_at,
                "total_seconds": time.perf_counter() - started,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
        )
        with atomic_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            plot_routing(metrics, staging / ROUTING_PLOT)
            (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            (staging / "README.md").write_text(model_card(chosen, metrics, bench))
            (staging / RECIPE_FILE).write_text(
                json.dumps({"digest": chosen.digest(), "version": RECIPE_VERSION, **asdict(chosen)}, indent=2)
            )
    return PretrainResult(target, metrics)


def model_card(recipe: Recipe, metrics: dict[str, Any], bench: ExpertBench) -> str:
    """The README of the checkpoint: what it is, how it was made, and what this run measured."""
    train_log = metrics["train"]
    world = bench.world
    between, within = metrics["routing_between_categories_tv"], metrics["routing_within_category_tv"]
    lines = [
        "---",
        "library_name: transformers",
        "license: apache-2.0",
        "tags: [fedexperts, expertbench, mixture-of-experts, olmoe]",
        "---",
        "",
        f"# fedexperts built-in model `{recipe.folder_name}`",
        "",
        f"A {metrics['parameters'] / 1e6:.2f}M-parameter OLMoE ({recipe.num_layers} layers, hidden "
        f"{recipe.hidden_size}, {recipe.num_experts} experts of width {recipe.expert_size} per layer, "
        f"top-{recipe.top_k}) "
        f"with a {metrics['vocab_size']}-token byte-level BPE tokenizer, pretrained from scratch "
        f"on the ExpertBench world (seed {recipe.world_seed}: {len(world.towns)} towns, {len(world.people)} people, "
        f"{len(world.goods)} goods, {len(world.facts)} facts). Made by `fedexperts pretrain` (recipe `{recipe.name}`, "
        f"hash `{recipe.digest()}`); every number below was measured by that run.",
        "",
        "## Training",
        "",
        f"- {train_log['steps']} steps of {recipe.batch_size} x {recipe.seq_len} tokens "
        f"({train_log['tokens'] / 1e6:.2f}M tokens, {metrics['corpus_blocks']} packed blocks), "
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
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "The tokenizer has a chat template (`<|user|>` / `<|assistant|>` turns, `<|eos|>` ends an answer). "
        f"Recipe and raw numbers: `{RECIPE_FILE}`, `{METRICS_FILE}`. Rebuild with `fedexperts pretrain --force`.",
        "",
    ]
    return "\n".join(lines)


def show_summary(path: Path, console: Any) -> None:
    """Print the card's main numbers from a built checkpoint's metrics file."""
    from rich.table import Table

    metrics = json.loads((path / METRICS_FILE).read_text())
    console.print(
        f"{path}\n{metrics['parameters'] / 1e6:.2f}M parameters; pretraining took {metrics['train']['seconds']:.0f} s "
        f"(whole command {metrics['total_seconds']:.0f} s, {metrics['threads']} threads); "
        f"probe accuracy {metrics['probe_accuracy']:.1%} on {metrics['probe_count']} facts "
        f"(chance {metrics['probe_chance']:.0%})"
    )
    table = Table(title="held-out tasks (greedy) and routing per category")
    for column in ("category", "EM canonical", "ROUGE-L canonical", "EM clients", "ROUGE-L clients", "routing entropy"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category in CATEGORIES:
        canonical, clients = metrics["canonical"][category], metrics["client_styles"][category]
        table.add_row(
            category,
            f"{canonical['exact_match']:.2f}",
            f"{canonical['rouge_l']:.2f}",
            f"{clients['exact_match']:.2f}",
            f"{clients['rouge_l']:.2f}",
            f"{metrics['routing_entropy_bits'][category]:.3f} bits",
        )
    console.print(table)
    console.print(
        f"routing: total variation {metrics['routing_between_categories_tv']:.3f} between categories vs "
        f"{metrics['routing_within_category_tv']:.3f} within a category (split halves); card: {path / 'README.md'}"
    )

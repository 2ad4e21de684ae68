"""What names a built-in model: the :class:`Recipe`, its hash, and where its checkpoint is cached.

A recipe holds every setting that decides the checkpoint; its digest (with :data:`RECIPE_VERSION`) names
the folder under ``$FEDEXPERTS_CACHE/models`` (default ``~/.cache/fedexperts``). :func:`is_built` tells a
complete checkpoint of exactly that recipe from a missing, partial or different one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fedexperts.errors import FedExpertsError

RECIPE_VERSION = 1
"""Part of the hash: bump it when the corpus, tokenizer or training code changes what a recipe makes."""
RECIPE_FILE = "fedexperts_recipe.json"
METRICS_FILE = "fedexperts_metrics.json"
ROUTING_PLOT = "routing.png"


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
    architecture: Literal["olmoe", "switch_transformers"] = "olmoe"
    """A decoder-only OLMoE, or an encoder-decoder Switch Transformer (``num_layers`` encoder and as many
    decoder blocks, every second one sparse, top-1 routing: ``top_k`` is unused)."""
    expert_capacity: int = 0
    """Switch: tokens per expert and sequence its router admits (0 for OLMoE, which has no capacity)."""

    def digest(self) -> str:
        fields = asdict(self)
        for name in _LATER_FIELDS:  # fields added later count only when set: older recipes keep their hash
            if fields[name] == _DEFAULTS[name]:
                del fields[name]
        text = json.dumps({"version": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        kind = "olmoe" if self.architecture == "olmoe" else "switch"
        return f"expertbench-{kind}-{self.name}-{self.digest()}"


_LATER_FIELDS = ("architecture", "expert_capacity")
_DEFAULTS = {name: Recipe.__dataclass_fields__[name].default for name in _LATER_FIELDS}


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
    "experts32": Recipe(name="experts32", num_experts=32, expert_size=32),
    "switch-8": Recipe(name="switch-8", architecture="switch_transformers", num_experts=8, top_k=1, expert_capacity=16),
    "switch-32": Recipe(
        name="switch-32",
        architecture="switch_transformers",
        num_experts=32,
        top_k=1,
        expert_size=32,
        expert_capacity=4,
    ),
    "switch-micro": Recipe(
        name="switch-micro",
        architecture="switch_transformers",
        vocab_size=400,
        hidden_size=32,
        num_layers=2,
        num_experts=4,
        top_k=1,
        expert_size=32,
        expert_capacity=16,
        seq_len=64,
        batch_size=8,
        steps=12,
        warmup_steps=2,
        num_documents=200,
        eval_per_category=4,
        eval_styles=1,
    ),
}
"""``default`` is the base model every command finds (built on first use); ``micro`` trains in seconds, for tests;
``experts32`` is ``default`` with 32 narrower experts per layer (the same expert parameters in all), as in FedMoE's
Switch-base-32, where which sub-MoE a client holds can matter. ``model.name = "builtin:experts32"`` selects one.
``switch-8`` and ``switch-32`` are encoder-decoder Switch Transformers of the same width (8 experts, or 32 narrower
ones, per sparse block; expert capacity 16 or 4 tokens per sequence: a capacity factor of 2 over the ``seq_len / 2``
tokens a pretraining side holds), as FedMoE's baselines and FedMoE itself use; ``switch-micro`` trains in seconds,
for tests."""


def resolve_recipe(recipe: Recipe | str) -> Recipe:
    """A recipe, or the named one from :data:`RECIPES` (a clear error for an unknown name)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise FedExpertsError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]


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


def recipe_record(recipe: Recipe) -> str:
    """The contents of :data:`RECIPE_FILE`: the digest, the version and every field."""
    return json.dumps({"digest": recipe.digest(), "version": RECIPE_VERSION, **asdict(recipe)}, indent=2)

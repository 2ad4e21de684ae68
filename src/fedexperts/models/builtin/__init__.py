"""The built-in base model: a tiny OLMoE pretrained on the ExpertBench world, cached by recipe hash.

No model can be downloaded here, so fedexperts makes its own (:mod:`.pretraining`): a byte-level BPE
tokenizer and a stock transformers OLMoE (8 experts per layer, top-2) pretrained on ExpertBench's corpus.
The checkpoint is a plain Hugging Face folder with a model card (:mod:`.card`) holding the numbers this
very run measured: probe accuracy, per-category scores and per-category routing. It lives in
``$FEDEXPERTS_CACHE`` (default ``~/.cache/fedexperts``) under a folder named by the recipe's hash
(:mod:`.recipe`), is written atomically, and :func:`default_model_path` builds it on first use. The
``switch-*`` recipes make an encoder-decoder Switch Transformer the same way (``docs/seq2seq.md``).
"""

from __future__ import annotations

from pathlib import Path

from fedexperts.errors import FedExpertsError
from fedexperts.models.builtin.card import measure, model_card
from fedexperts.models.builtin.pretraining import (
    ASSISTANT,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    USER,
    PretrainResult,
    TrainLog,
    build_model,
    build_tokenizer,
    packed_corpus,
    pretrain,
    torch_threads,
    train,
)
from fedexperts.models.builtin.recipe import (
    METRICS_FILE,
    RECIPE_FILE,
    RECIPE_VERSION,
    RECIPES,
    ROUTING_PLOT,
    Recipe,
    cache_root,
    is_built,
    model_path,
    resolve_recipe,
)

__all__ = [
    "ASSISTANT",
    "CHAT_TEMPLATE",
    "EOS",
    "METRICS_FILE",
    "PAD",
    "RECIPES",
    "RECIPE_FILE",
    "RECIPE_VERSION",
    "ROUTING_PLOT",
    "USER",
    "PretrainResult",
    "Recipe",
    "TrainLog",
    "build_model",
    "build_tokenizer",
    "cache_root",
    "default_model_path",
    "is_built",
    "measure",
    "model_card",
    "model_path",
    "packed_corpus",
    "pretrain",
    "resolve_recipe",
    "torch_threads",
    "train",
]


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

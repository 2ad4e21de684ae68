"""Try an exported model: load its folder (either kind) and complete prompts greedily.

A prompt is an instruction (with an optional context), formatted by the template the run trained
with (the export manifest records it; a folder fedexperts did not export gets the tokenizer's chat
template if it has one, else Alpaca), so the model sees what it learnt to answer; ``raw`` sends the
text as it is. Generation is :func:`fedexperts.evaluation.generate`, the run's own: greedy,
left-padded batches, stopping at the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch

from fedexperts.data.templates import PromptTemplate, prompt_template
from fedexperts.evaluation import generate as greedy
from fedexperts.export.hf import ADAPTER_FOLDER
from fedexperts.export.manifest import PERSONALIZED, read_manifest
from fedexperts.export.personalized import load_personalized
from fedexperts.models.load import load_model, load_tokenizer


@dataclass(frozen=True)
class ExportedModel:
    model: Any
    tokenizer: Any
    template: PromptTemplate

    def prompt(self, instruction: str, context: str = "") -> str:
        """The text the model is given for ``instruction`` (and ``context``), as in training."""
        return self.template.prompt(self.tokenizer, instruction, context)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        contexts: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        raw: bool = False,
    ) -> list[str]:
        """Greedy completions of ``prompts`` (instructions, each with its context if given; ``raw``: as they are)."""
        given = list(contexts) if contexts is not None else [""] * len(prompts)
        texts = (
            list(prompts) if raw else [self.prompt(text, context) for text, context in zip(prompts, given, strict=True)]
        )
        return greedy(
            self.model,
            self.tokenizer,
            texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            add_special_tokens=raw or self.template.add_special_tokens,
        )


def load_exported(
    folder: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> ExportedModel:
    """An export folder's model and tokenizer (a stock one with its PEFT adapter if it has one), in eval mode.

    ``dtype``: ``auto`` keeps the folder's own.
    """
    source = Path(folder)
    manifest = read_manifest(source)
    if manifest.get("kind") == PERSONALIZED:
        model: Any = load_personalized(source, dtype=None if dtype == "auto" else dtype, device=device)
        tokenizer = load_tokenizer(source)
    else:
        loaded = load_model(source, dtype=dtype, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        if (source / ADAPTER_FOLDER).is_dir():
            model = peft.PeftModel.from_pretrained(model, source / ADAPTER_FOLDER).eval()
    kind = manifest.get("template")
    template = PromptTemplate(kind) if kind in ("chat", "alpaca") else prompt_template(tokenizer)
    return ExportedModel(model, tokenizer, template)


def generate(
    model: str | Path | ExportedModel,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    raw: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts`` by an export folder's model (or one :func:`load_exported` gave)."""
    exported = model if isinstance(model, ExportedModel) else load_exported(model)
    chosen = [prompts] if isinstance(prompts, str) else list(prompts)
    return exported.generate(chosen, max_new_tokens=max_new_tokens, raw=raw)

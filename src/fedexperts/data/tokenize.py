"""Tokenization for instruction tuning: loss on the response only, and truncation that keeps it.

Prompt and completion are tokenized separately and concatenated, exactly as generation sees them
(the prompt alone, then the model's own tokens). Labels are ``-100`` on the prompt and on padding.
When an example is too long the prompt loses tokens from its left end; the response is never cut.
An example whose response leaves fewer than ``min_prompt_tokens`` for the prompt cannot be made to
fit: it raises :class:`DataError` naming the row, or is skipped and counted when asked.

For an encoder-decoder model the prompt and the response are not concatenated: the prompt is the
encoder's input and the response the decoder's labels, each within ``max_length``
(:func:`fedexperts.data.layout.split_example`); the same rules hold (the prompt loses tokens from its
left end, the response is never cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from fedexperts.data.layout import CAUSAL, IGNORE_INDEX, BatchLayout
from fedexperts.data.templates import TemplateName, prompt_template
from fedexperts.errors import DataError


class OverlongRowError(DataError):
    """A row whose response leaves too little of ``max_length`` for its prompt."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row} cannot fit: {reason}; raise max_length or pass skip_overlong to drop such rows")
        self.row = row
        """1-based, in the dataset given."""
        self.reason = reason


@dataclass(frozen=True)
class TokenizedData:
    dataset: datasets.Dataset
    """``input_ids`` and ``labels`` (plus the kept columns), one row per usable example."""
    truncated: int
    """Examples whose prompt lost tokens from the left."""
    skipped: tuple[str, ...] = ()
    """One message per example that could not fit (only with ``skip_overlong``)."""


def tokenize_instructions(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int = 512,
    template: TemplateName = "auto",
    min_prompt_tokens: int = 8,
    skip_overlong: bool = False,
    keep_columns: Sequence[str] = ("category",),
    layout: BatchLayout = CAUSAL,
) -> TokenizedData:
    """Tokenize a schema dataset (instruction, context, response) for response-only training.

    ``layout`` is the model's (:func:`fedexperts.data.layout.batch_layout`): one sequence per row, or
    the prompt for the encoder and the response for the decoder.
    """
    chosen = prompt_template(tokenizer, template)
    rows = dataset.to_dict()
    triples = list(zip(rows["instruction"], rows["context"], rows["response"], strict=True))
    prompts = [chosen.prompt(tokenizer, instruction, context) for instruction, context, _ in triples]
    completions = [chosen.completion(tokenizer, *triple) for triple in triples]
    prompt_ids = tokenizer(prompts, add_special_tokens=chosen.add_special_tokens)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    kept_columns = [name for name in keep_columns if name in rows]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], **{name: [] for name in kept_columns}}
    truncated, skipped = 0, []
    for index, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        try:
            input_ids, labels, was_cut = layout.example(
                prompt, completion, max_length=max_length, min_prompt_tokens=min_prompt_tokens
            )
        except ValueError as error:
            if not skip_overlong:
                raise OverlongRowError(index + 1, str(error)) from None
            skipped.append(f"row {index + 1} cannot fit: {error}")
            continue
        truncated += was_cut
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        for name in kept_columns:
            out[name].append(rows[name][index])
    return TokenizedData(datasets.Dataset.from_dict(out), truncated, tuple(skipped))


@dataclass(frozen=True)
class InstructionCollator:
    """Right-pads a batch: ``pad_token_id`` in ``input_ids``, ``-100`` in ``labels``, 0 in ``attention_mask``.

    ``input_ids`` and ``labels`` are each padded to their own longest row: equal widths for a
    decoder-only row, the prompt's and the response's for an encoder-decoder one
    (:mod:`fedexperts.data.layout`).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        label_width = max(len(feature["labels"]) for feature in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), label_width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
            labels[row, : len(feature["labels"])] = torch.as_tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

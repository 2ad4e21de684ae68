"""Where a prompt and its response go in a model: one sequence (decoder-only) or encoder and decoder.

A decoder-only model reads ``prompt + response`` as one sequence and predicts each next token, so its
labels are shifted by one against the logits. An encoder-decoder model (Switch Transformers) reads the
prompt in its encoder and the response in its decoder: the labels are the response itself, the model
builds the decoder's input from them with its own ``prepare_decoder_input_ids_from_labels`` (start
token, then the labels shifted right), and logits and labels line up position for position.

:func:`batch_layout` picks the layout once from the model's config (``is_encoder_decoder``); there is
no user setting for it. Token rows keep the same two keys either way (``input_ids``, ``labels``), so
the collator and the row stores need not know which layout made them: in a seq2seq row ``input_ids``
is the encoder's prompt and ``labels`` the decoder's response, of their own lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedexperts.moe.families import unwrap_model

IGNORE_INDEX = -100


def join_example(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], *, max_length: int, min_prompt_tokens: int
) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)``; :class:`ValueError` when the completion does not fit."""
    room = max_length - len(completion_ids)
    if room < min(min_prompt_tokens, len(prompt_ids)):
        raise ValueError(
            f"its response takes {len(completion_ids)} tokens, leaving {max(room, 0)} of max_length "
            f"{max_length} for a prompt that needs at least {min(min_prompt_tokens, len(prompt_ids))}"
        )
    kept = list(prompt_ids[len(prompt_ids) - room :]) if room < len(prompt_ids) else list(prompt_ids)
    input_ids = kept + list(completion_ids)
    labels = [IGNORE_INDEX] * len(kept) + list(completion_ids)
    return input_ids, labels, len(kept) < len(prompt_ids)


def split_example(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], *, max_length: int, min_prompt_tokens: int
) -> tuple[list[int], list[int], bool]:
    """Encoder-decoder ``(input_ids, labels, truncated)``: each side has its own ``max_length``.

    The prompt (encoder) loses tokens from its left end; the response (decoder) is never cut, and a
    response longer than ``max_length`` raises :class:`ValueError`. ``min_prompt_tokens`` bounds
    nothing here (the prompt never shares its room with the response); it is taken so that both
    layouts are called alike.
    """
    del min_prompt_tokens
    if len(completion_ids) > max_length:
        raise ValueError(
            f"its response takes {len(completion_ids)} tokens, more than the decoder's max_length {max_length}"
        )
    if not completion_ids:
        raise ValueError("its response has no tokens, so the decoder has nothing to learn")
    kept = list(prompt_ids[max(len(prompt_ids) - max_length, 0) :])
    return kept, list(completion_ids), len(kept) < len(prompt_ids)


@dataclass(frozen=True)
class BatchLayout:
    """How token rows become a model's inputs and how its logits meet the labels (see the module doc)."""

    encoder_decoder: bool

    @property
    def name(self) -> str:
        return "seq2seq" if self.encoder_decoder else "causal"

    def example(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], *, max_length: int, min_prompt_tokens: int
    ) -> tuple[list[int], list[int], bool]:
        """One token row (:func:`join_example` or :func:`split_example`)."""
        chosen = split_example if self.encoder_decoder else join_example
        return chosen(prompt_ids, completion_ids, max_length=max_length, min_prompt_tokens=min_prompt_tokens)

    def model_inputs(self, model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the forward over a collated ``batch`` (its labels are not passed).

        Encoder-decoder: the decoder's input from the model's own label shift, and a decoder mask that
        marks the labels' padding (it sits at the right end, so causal attention never sees it from a
        real token; the mask keeps it out of routing counts and the auxiliary loss).
        """
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.encoder_decoder:
            labels = batch["labels"]
            inputs["decoder_input_ids"] = unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=labels)
            inputs["decoder_attention_mask"] = (labels != IGNORE_INDEX).long()
        return inputs

    def stack_masks(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Real-token masks of :meth:`model_inputs` per stack (``encoder``/``decoder``, as MoE layers name them)."""
        if self.encoder_decoder:
            return {"encoder": inputs["attention_mask"], "decoder": inputs["decoder_attention_mask"]}
        return {"decoder": inputs["attention_mask"]}

    def aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` position for position: shifted by one for a decoder-only model."""
        if self.encoder_decoder:
            return logits, labels
        return logits[:, :-1], labels[:, 1:]

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy over the positions whose label is not ``IGNORE_INDEX`` (float32 logits).

        A decoder-only model's labels are shifted left (the last position gets ``IGNORE_INDEX``)
        rather than its logits cut: the same terms, without copying the logits and zero-filling their
        gradient. ``reduction="none"`` gives one value per position of ``logits`` (0 where ignored).
        """
        if not self.encoder_decoder:
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    def target_count(self, labels: torch.Tensor) -> int:
        """How many tokens :meth:`loss` is taken over."""
        return int(self.targets_per_row(labels).sum())

    def targets_per_row(self, labels: torch.Tensor) -> torch.Tensor:
        """How many tokens of each row :meth:`loss` is taken over (a tensor, one count per row)."""
        return (labels[:, int(not self.encoder_decoder) :] != IGNORE_INDEX).sum(dim=1)

    @property
    def generation_padding(self) -> str:
        """Which side prompts are padded on for generation.

        Left for a decoder-only model (the new tokens follow every prompt's last token); right for an
        encoder, as in training: Switch's expert capacity admits tokens in position order, and padding
        in front would take capacity from the real tokens behind it.
        """
        return "right" if self.encoder_decoder else "left"

    def completion_tokens(self, generated: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """What ``generate`` produced beyond the prompt: after it (decoder-only), or the decoder's
        output after its start token (encoder-decoder)."""
        return generated[:, 1:] if self.encoder_decoder else generated[:, prompt_width:]


CAUSAL = BatchLayout(encoder_decoder=False)
SEQ2SEQ = BatchLayout(encoder_decoder=True)


def batch_layout(model_or_config: Any) -> BatchLayout:
    """The layout of a model (or its config): :data:`SEQ2SEQ` when ``is_encoder_decoder``, else :data:`CAUSAL`."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL

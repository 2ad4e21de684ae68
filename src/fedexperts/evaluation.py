"""Scores: exact match, ROUGE, token F1, greedy generation, and multiple-choice accuracy by log-likelihood.

Multiple-choice questions (ExpertBench's knowledge probes, MMLU from ``eval.mmlu``) are scored by
the summed log-probability of each choice's tokens after the prompt; the most likely choice is the
answer (:func:`multiple_choice_accuracy`, :func:`mmlu_scores`).

The text scores (text in, numbers out) live in :mod:`fedexperts.metrics`, torch-free: exact match
and token F1 as in SQuAD (lowercased, punctuation and articles dropped), ROUGE-1/2/L from
rouge-score with its Porter stemmer (``eval.rouge_stemmer``) and a choice of tokenizer for text not
in Latin script (``eval.rouge_tokenizer``). Until the SQuAD metrics were added, exact match here
normalised only whitespace (case and punctuation counted) and ROUGE-L was unstemmed; run records
written then hold those numbers.

Every forward runs under :func:`fedexperts.moe.precision.autocast_for`, as training does: float32
trainables over a half-precision base meet in the base's dtype; a float32 model runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedexperts import metrics
from fedexperts.data.layout import IGNORE_INDEX, batch_layout
from fedexperts.data.tokenize import InstructionCollator
from fedexperts.metrics import RougeTokenizer
from fedexperts.moe.precision import autocast_for
from fedexperts.reporting.schema import MMLUScores, Scores


def exact_match(prediction: str, reference: str) -> bool:
    """SQuAD exact match (see :func:`fedexperts.metrics.normalize_answer`)."""
    return metrics.exact_match(prediction, reference)


def rouge_l(prediction: str, reference: str, *, stemmer: bool = True, tokenizer: RougeTokenizer = "default") -> float:
    """ROUGE-L F-measure of the longest common token subsequence (rouge-score, stemmed by default)."""
    return metrics.rouge_scores(prediction, reference, stemmer=stemmer, tokenizer=tokenizer).rouge_l


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS, else 0 (padding is masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    add_special_tokens: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts``, without the prompt or special tokens.

    Batches are padded on the side the model's layout asks for
    (:attr:`~fedexperts.data.layout.BatchLayout.generation_padding`); an encoder-decoder's text is its
    decoder's output alone.
    """
    layout = batch_layout(model)
    pad = pad_token_id(tokenizer)
    device = _device(model)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[start : start + batch_size]), add_special_tokens=add_special_tokens)
        rows = encoded["input_ids"]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            place = slice(width - len(row), width) if layout.generation_padding == "left" else slice(0, len(row))
            input_ids[index, place] = torch.as_tensor(row)
            attention_mask[index, place] = 1
        with autocast_for(model):
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        completions = layout.completion_tokens(generated, width)
        outputs.extend(tokenizer.batch_decode(completions, skip_special_tokens=True))
    return outputs


class MultipleChoice(Protocol):
    """A question whose ``choices`` continue ``prompt``; ``answer_index`` marks the right one."""

    @property
    def prompt(self) -> str: ...
    @property
    def choices(self) -> Sequence[str]: ...
    @property
    def answer_index(self) -> int: ...


@torch.no_grad()
def continuation_log_likelihoods(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    add_special_tokens: bool = False,
) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens given its prompt.

    The continuation is the target of the model's layout: after the prompt in one sequence, or the
    decoder's labels under the prompt in the encoder.
    """
    layout = batch_layout(model)
    collate = InstructionCollator(pad_token_id(tokenizer))
    device = _device(model)
    prompt_ids = tokenizer([prompt for prompt, _ in pairs], add_special_tokens=add_special_tokens)["input_ids"]
    continuation_ids = tokenizer([text for _, text in pairs], add_special_tokens=False)["input_ids"]
    if any(not ids for ids in prompt_ids):
        raise ValueError("every prompt must have at least one token to condition the continuation on")
    rows = []
    for prompt, continuation in zip(prompt_ids, continuation_ids, strict=True):
        width = len(prompt) + len(continuation)  # room for both: nothing is cut
        input_ids, labels, _ = layout.example(prompt, continuation, max_length=width, min_prompt_tokens=0)
        rows.append({"input_ids": input_ids, "labels": labels})
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = {key: value.to(device) for key, value in collate(rows[start : start + batch_size]).items()}
        with autocast_for(model):
            logits = model(**layout.model_inputs(model, batch)).logits
        logits, targets = layout.aligned(logits, batch["labels"])
        for index in range(targets.shape[0]):
            # only the continuation's positions: a full-vocabulary softmax over long prompts (MMLU) would not fit
            positions = (targets[index] != IGNORE_INDEX).nonzero().squeeze(-1)
            log_probs = torch.log_softmax(logits[index, positions].float(), dim=-1)
            scores.append(float(log_probs.gather(-1, targets[index, positions][:, None]).sum()))
    return scores


def choice_predictions(model: Any, tokenizer: Any, questions: Sequence[MultipleChoice], **kwargs: Any) -> list[int]:
    """Index of the most likely choice of each question (``kwargs`` go to the scorer)."""
    pairs = [(question.prompt, choice) for question in questions for choice in question.choices]
    scores = continuation_log_likelihoods(model, tokenizer, pairs, **kwargs)
    predictions, offset = [], 0
    for question in questions:
        count = len(question.choices)
        chunk = scores[offset : offset + count]
        predictions.append(max(range(count), key=chunk.__getitem__))
        offset += count
    return predictions


def multiple_choice_accuracy(model: Any, tokenizer: Any, questions: Sequence[MultipleChoice], **kwargs: Any) -> float:
    """Fraction of questions whose right choice is the most likely one."""
    if not questions:
        raise ValueError("no questions to score")
    predictions = choice_predictions(model, tokenizer, questions, **kwargs)
    return sum(p == q.answer_index for p, q in zip(predictions, questions, strict=True)) / len(questions)


class SubjectQuestion(MultipleChoice, Protocol):
    """A multiple-choice question of a named subject (:class:`fedexperts.data.mmlu.MMLUQuestion`)."""

    @property
    def subject(self) -> str: ...


def mmlu_scores(model: Any, tokenizer: Any, questions: Sequence[SubjectQuestion], **kwargs: Any) -> MMLUScores:
    """Accuracy over all ``questions`` and per subject, from one pass of :func:`choice_predictions`."""
    if not questions:
        raise ValueError("no questions to score")
    was_training = model.training
    model.eval()
    try:
        predictions = choice_predictions(model, tokenizer, questions, **kwargs)
    finally:
        model.train(was_training)
    right: dict[str, list[bool]] = {}
    for prediction, question in zip(predictions, questions, strict=True):
        right.setdefault(question.subject, []).append(prediction == question.answer_index)
    every = [flag for flags in right.values() for flag in flags]
    return MMLUScores(
        overall=sum(every) / len(every),
        subjects={subject: sum(flags) / len(flags) for subject, flags in sorted(right.items())},
    )


@dataclass(frozen=True)
class RoutingProfile:
    """How often each expert is chosen, per group of inputs (e.g. a task category) and MoE layer."""

    groups: tuple[str, ...]
    layers: tuple[str, ...]
    counts: torch.Tensor
    """(groups, layers, experts): how many real tokens of each group chose each expert."""

    def distributions(self) -> torch.Tensor:
        """Each (group, layer) row normalised to a distribution over experts."""
        counts = self.counts.double()
        return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)

    def entropy(self) -> dict[str, float]:
        """Per group: entropy (bits) of its expert distribution, averaged over layers; lower is more specialised."""
        entropies = _entropy_bits(self.distributions()).mean(dim=-1)
        return {group: float(value) for group, value in zip(self.groups, entropies, strict=True)}

    def divergence(self) -> dict[str, float]:
        """Per group: Jensen-Shannon divergence (bits) from all groups pooled, averaged over layers.

        0 when a group routes like everything else; 1 at most, for disjoint experts.
        """
        pooled = self.counts.double().sum(dim=0, keepdim=True)
        pooled = pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(1)
        own = self.distributions()
        middle = (own + pooled) / 2
        divergence = _entropy_bits(middle) - (_entropy_bits(own) + _entropy_bits(pooled.expand_as(own))) / 2
        return {group: float(value) for group, value in zip(self.groups, divergence.mean(dim=-1), strict=True)}

    def total_variation(self, first: str, second: str) -> float:
        """Total-variation distance between two groups' expert distributions, averaged over layers."""
        own = self.distributions()
        a, b = own[self.groups.index(first)], own[self.groups.index(second)]
        return float(0.5 * (a - b).abs().sum(dim=-1).mean())

    def merged(self, groups: Mapping[str, Sequence[str]]) -> RoutingProfile:
        """A profile whose groups pool the counts of the listed groups (e.g. two halves of one category)."""
        counts = [sum(self.counts[self.groups.index(part)] for part in parts) for parts in groups.values()]
        return RoutingProfile(tuple(groups), self.layers, torch.stack([torch.as_tensor(c) for c in counts]))


def _entropy_bits(distribution: torch.Tensor) -> torch.Tensor:
    logs = torch.where(distribution > 0, distribution.log2(), torch.zeros_like(distribution))
    return -(distribution * logs).sum(dim=-1)


@torch.no_grad()
def routing_profile(model: Any, batches: Mapping[str, Iterable[Mapping[str, torch.Tensor]]]) -> RoutingProfile:
    """Run each group's collated batches and count the expert choices of real tokens (an encoder-decoder's
    encoder layers over the prompts, its decoder layers over the responses)."""
    from fedexperts.moe.routing import RoutingRecorder

    layout = batch_layout(model)
    device = _device(model)
    per_group = []
    layers: tuple[str, ...] = ()
    for group_batches in batches.values():
        with RoutingRecorder(model) as recorder:
            for batch in group_batches:
                inputs = layout.model_inputs(model, {key: value.to(device) for key, value in batch.items()})
                masks = recorder.mask(inputs["attention_mask"], inputs.get("decoder_attention_mask"))
                with masks, autocast_for(model):
                    model(**inputs)
        counts = recorder.counts()
        layers = tuple(counts)
        per_group.append(torch.stack([counts[name] for name in layers]))
    return RoutingProfile(tuple(batches), layers, torch.stack(per_group))


@dataclass(frozen=True)
class EvalSet:
    """Held-out instruction examples: prompts and references for generation, token rows for the loss."""

    prompts: tuple[str, ...]
    references: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...]
    """``input_ids`` and ``labels`` per example (response-only labels), as made by ``tokenize_instructions``."""

    def __len__(self) -> int:
        return len(self.prompts)


@torch.no_grad()
def token_loss(model: Any, rows: Sequence[Mapping[str, Any]], *, pad_token_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over every supervised token of ``rows`` (not a mean of per-batch means)."""
    layout = batch_layout(model)
    collate = InstructionCollator(pad_token_id)
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate([dict(row) for row in rows[start : start + batch_size]])
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast_for(model):
            logits = model(**layout.model_inputs(model, batch)).logits
        total += float(layout.loss(logits, batch["labels"], reduction="sum"))
        count += layout.target_count(batch["labels"])
    return total / max(count, 1)


def instruction_scores(
    model: Any,
    tokenizer: Any,
    data: EvalSet,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    add_special_tokens: bool = False,
    rouge_stemmer: bool = True,
    rouge_tokenizer: RougeTokenizer = "default",
) -> Scores:
    """Loss and the text scores (:func:`fedexperts.metrics.text_scores`) of greedy completions on ``data``.

    ``add_special_tokens`` must match how the prompts were tokenized for training (the template's choice);
    ``rouge_stemmer`` and ``rouge_tokenizer`` are ``eval.rouge_stemmer`` and ``eval.rouge_tokenizer``.
    """
    if not len(data):
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    try:
        loss = token_loss(model, data.rows, pad_token_id=pad_token_id(tokenizer), batch_size=batch_size)
        predictions = generate(
            model,
            tokenizer,
            data.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            add_special_tokens=add_special_tokens,
        )
    finally:
        model.train(was_training)
    text = metrics.text_scores(predictions, data.references, stemmer=rouge_stemmer, tokenizer=rouge_tokenizer)
    return Scores(
        loss=loss,
        exact_match=text.exact_match,
        rouge_l=text.rouge_l,
        examples=len(predictions),
        rouge_1=text.rouge_1,
        rouge_2=text.rouge_2,
        token_f1=text.token_f1,
        accuracy=text.accuracy,
    )

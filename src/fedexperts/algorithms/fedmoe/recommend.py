"""Stage 2 of FedMoE: expert recommendation and its per-client schedule (model-free).

Reading of the paper's global expert recommendation: :func:`recommend` proposes a structure from
the clients whose stage-1 activation looks most alike (cosine similarity); a
:class:`RecommendationState` per client decides, from its validation scores, when to try one and
whether to keep it (patience, trial, revert-and-freeze). Structures are sorted *global* expert
indices per MoE layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from fedexperts.algorithms.fedmoe.activation import normalised
from fedexperts.errors import FedExpertsError


def _flattened(client: str, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([normalised(v, f"client {client!r}, layer {i}") for i, v in enumerate(vectors)])


def copies(first: str, second: str, origins: Mapping[str, tuple[str, ...]]) -> bool:
    """Whether two clients' ``p`` are copies: one was estimated from the other, or both from the same clients.

    ``origins`` maps a client to the clients its ``p`` was estimated from (empty or absent: its own).
    """
    one, other = origins.get(first) or (first,), origins.get(second) or (second,)
    return first in other or second in one or set(one) == set(other)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def recommend(
    client: str,
    activations: Mapping[str, Sequence[torch.Tensor]],
    current: Mapping[str, Sequence[Sequence[int]]],
    *,
    top_k_neighbours: int,
    min_experts: Sequence[int],
) -> list[list[int]]:
    """A new structure for ``client`` (sorted global indices per layer) from similar clients.

    ``activations`` holds the candidate clients' per-layer activation over the *global* experts
    (zeros for experts a client does not hold; each layer normalised here; the caller leaves out
    clients whose ``p`` is a copy of ``client``'s), ``current`` every client's kept experts. The
    paper's global expert recommendation, as read here:

    * similarity: cosine between the client's concatenated per-layer vectors and each other
      client's; the ``top_k_neighbours`` most similar are its neighbours (ties by client id);
    * estimate: the client's activation of every expert is the mean of the neighbours' weighted
      by their similarity (non-negative, since activations are; a plain mean if all are zero);
    * size: ``n`` = the neighbours' mean total expert count (over all layers, rounded half up)
      minus the client's own;
    * change, ranked globally across layers by the estimate: ``n > 0`` adds the ``n``
      highest-estimated experts the client lacks, ``n < 0`` drops its ``-n`` lowest-estimated ones,
      never below a layer's ``min_experts`` (ties: add lower layers and indices first, drop higher
      ones first).
    """
    if top_k_neighbours < 1:
        raise FedExpertsError(f"top_k_neighbours must be at least 1, got {top_k_neighbours}")
    missing = [name for name in [client, *activations] if name not in current]
    if client not in activations or missing:
        raise FedExpertsError(
            f"recommend: need the activation and structure of {client!r} and the structure of every client; "
            f"missing structures: {missing}"
        )
    own = activations[client]
    layer_sizes = [int(v.numel()) for v in own]
    if len(min_experts) != len(own):
        raise FedExpertsError(f"min_experts covers {len(min_experts)} layers, the activation {len(own)}")
    for name, vectors in activations.items():
        if [int(v.numel()) for v in vectors] != layer_sizes or len(current[name]) != len(layer_sizes):
            raise FedExpertsError(f"client {name!r} has a different layer structure from {client!r}")
    others = sorted(name for name in activations if name != client)
    if not others:
        raise FedExpertsError(f"recommend: {client!r} has no other client to learn from")

    target = _flattened(client, own)
    similarity = {
        name: float(torch.nn.functional.cosine_similarity(target, _flattened(name, activations[name]), dim=0))
        for name in others
    }
    neighbours = sorted(others, key=lambda name: (-similarity[name], name))[:top_k_neighbours]
    weights = [max(similarity[name], 0.0) for name in neighbours]
    if sum(weights) <= 0:
        weights = [1.0] * len(neighbours)
    total = sum(weights)

    estimate = [
        sum(
            normalised(activations[name][layer], f"client {name!r}, layer {layer}") * (weight / total)
            for name, weight in zip(neighbours, weights, strict=True)
        )
        for layer in range(len(layer_sizes))
    ]
    score = [
        vector.tolist() if isinstance(vector, torch.Tensor) else [0.0] * size
        for vector, size in zip(estimate, layer_sizes, strict=True)
    ]
    held = [{int(i) for i in current[client][layer]} for layer in range(len(layer_sizes))]
    mean_total = sum(sum(len(layer) for layer in current[name]) for name in neighbours) / len(neighbours)
    change = _round_half_up(mean_total) - sum(len(layer) for layer in held)
    if change > 0:
        lacking = [(layer, i) for layer, size in enumerate(layer_sizes) for i in range(size) if i not in held[layer]]
        lacking.sort(key=lambda item: (-score[item[0]][item[1]], item[0], item[1]))
        for layer, expert in lacking[:change]:
            held[layer].add(expert)
    elif change < 0:
        ranked = sorted(
            ((layer, i) for layer, experts in enumerate(held) for i in experts),
            key=lambda item: (score[item[0]][item[1]], -item[0], -item[1]),
        )
        dropped = 0
        for layer, expert in ranked:
            if dropped == -change:
                break
            if len(held[layer]) > int(min_experts[layer]):
                held[layer].discard(expert)
                dropped += 1
    return [sorted(layer) for layer in held]


class Action(StrEnum):
    KEEP = "keep"
    ADJUST = "adjust"
    """Try the proposed structure; the next evaluation decides whether it stays."""
    REVERT = "revert"
    """The trial did not beat the best score: go back to the previous structure, for good."""


@dataclass(frozen=True)
class Decision:
    action: Action
    structure: list[list[int]] | None = None
    """The structure to switch to (``None`` for KEEP)."""


@dataclass
class RecommendationState:
    """Per-client schedule of structure changes in stage 2.

    Reading of the paper's progressive adjustment: after every evaluation, :meth:`observe` is given
    the client's validation score. While it improves, nothing changes. After ``patience``
    evaluations without improvement (by more than ``min_delta``), a new structure is proposed
    (``propose``, normally :func:`recommend`) and the old one remembered. The next evaluation
    judges the trial: better than the best before it, and the new structure stays (and the cycle
    starts again); otherwise the client reverts to the remembered structure and its structure is
    frozen for the rest of training (no oscillation between structures).
    """

    patience: int
    higher_is_better: bool = True
    min_delta: float = 0.0
    best: float | None = None
    stale: int = 0
    previous: list[list[int]] | None = None
    """Structure before the adjustment under trial (``None``: no trial running)."""
    best_before_trial: float | None = None
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise FedExpertsError(f"patience must be at least 1, got {self.patience}")

    def _improves(self, score: float, reference: float | None) -> bool:
        if reference is None:
            return True
        return score > reference + self.min_delta if self.higher_is_better else score < reference - self.min_delta

    def observe(
        self, score: float, structure: Sequence[Sequence[int]], propose: Callable[[], list[list[int]]]
    ) -> Decision:
        """Record one evaluation of the client on its current ``structure`` and say what to do."""
        if not math.isfinite(score):
            raise FedExpertsError(f"validation score must be finite, got {score}")
        if self.frozen:
            return Decision(Action.KEEP)
        if self.previous is not None:  # judging a trial
            if self._improves(score, self.best_before_trial):
                self.best, self.stale = score, 0
                self.previous, self.best_before_trial = None, None
                return Decision(Action.KEEP)
            reverted = self.previous
            self.previous, self.frozen = None, True
            self.best = self.best_before_trial
            return Decision(Action.REVERT, reverted)
        if self._improves(score, self.best):
            self.best, self.stale = score, 0
            return Decision(Action.KEEP)
        self.stale += 1
        if self.stale < self.patience:
            return Decision(Action.KEEP)
        self.stale = 0
        proposal = [sorted(int(i) for i in layer) for layer in propose()]
        now = [sorted(int(i) for i in layer) for layer in structure]
        if proposal == now:  # nothing to try; wait another `patience` evaluations
            return Decision(Action.KEEP)
        self.previous, self.best_before_trial = now, self.best
        return Decision(Action.ADJUST, proposal)

    def abandon_trial(self) -> list[list[int]] | None:
        """End a trial no evaluation will judge (training is over): the structure to go back to, or ``None``."""
        reverted = self.previous
        if reverted is not None:
            self.previous, self.frozen = None, True
            self.best, self.best_before_trial = self.best_before_trial, None
        return reverted

    def to_json(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "higher_is_better": self.higher_is_better,
            "min_delta": self.min_delta,
            "best": self.best,
            "stale": self.stale,
            "previous": self.previous,
            "best_before_trial": self.best_before_trial,
            "frozen": self.frozen,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecommendationState:
        previous = data.get("previous")
        return cls(
            patience=int(data["patience"]),
            higher_is_better=bool(data.get("higher_is_better", True)),
            min_delta=float(data.get("min_delta", 0.0)),
            best=None if data.get("best") is None else float(data["best"]),
            stale=int(data.get("stale", 0)),
            previous=None if previous is None else [[int(i) for i in layer] for layer in previous],
            best_before_trial=None if data.get("best_before_trial") is None else float(data["best_before_trial"]),
            frozen=bool(data.get("frozen", False)),
        )

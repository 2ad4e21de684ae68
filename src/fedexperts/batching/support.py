"""Whether a setting's clients can train as row groups of one batch, and if not, why (said once, then sequential)."""

from __future__ import annotations

from torch import nn

from fedexperts.config import TrainConfig
from fedexperts.data.layout import CAUSAL, batch_layout
from fedexperts.interface import Algorithm
from fedexperts.moe.families import unwrap_model

_RANDOM_FIELDS = ("dropout", "jitter")
"""Config fields of a base model whose randomness is drawn inside frozen operations, one stream for the whole batch."""


def batching_refusal(algorithm: Algorithm, model: nn.Module, train: TrainConfig) -> str | None:
    """Why these clients must train one after another, or ``None`` when they can share a batch.

    Beyond the algorithm's own reason (:attr:`~fedexperts.interface.Algorithm.batching_refusal`):
    gradient checkpointing (its recomputed forward runs outside the row groups), encoder-decoders (not
    joined yet; Switch's expert capacity would also let rows compete for slots), and a base model that
    draws randomness inside frozen operations (attention dropout, router jitter), which would give
    clients other random draws than they get alone. Dropout *modules* are fine: each group draws from
    its own client's stream.
    """
    reason = algorithm.batching_refusal
    if reason is not None:
        return reason
    if train.gradient_checkpointing:
        return "train.gradient_checkpointing recomputes forwards outside the clients' row groups"
    base = unwrap_model(model)
    if batch_layout(base) is not CAUSAL:
        return "encoder-decoder batches are not joined by row groups yet (and expert capacity lets rows compete)"
    config = getattr(base, "config", None)
    if config is not None:
        for key, value in sorted(config.to_dict().items()):
            random = any(part in key for part in _RANDOM_FIELDS)
            if random and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                return f"the base model's {key}={value} draws one random stream for the whole batch"
    return None

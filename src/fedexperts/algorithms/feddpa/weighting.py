"""FedDPA's instance-wise dynamic weighting: each test example's local-adapter weight from its similarity to
the client's training data (arXiv 2403.19211; ``get_weight`` in the official
``GlobalModel_generated.py``).

An input is represented by the base model's final hidden state (after the last norm) at its last
token, or its mean over the input's tokens, computed with the local adapter alone (the code
switches to it with ``set_adapter('local')``). An example's local weight is
``l = max_weight * mean_j cos(e(x), e(x_j))`` over the prompts ``x_j`` of ``instances`` training rows,
and the global adapter gets ``1 - l`` (``set_local(['local'], [l, 1 - l])``). The code draws the
training rows at random for every test example; here they are the client's first ``instances``
training rows (its split's seeded order), represented once per client step, when the client's
adapters are loaded.

The weights are set by a forward pre-hook on the model, in eval mode, on every forward that starts a
sequence (no key-value cache yet): a generation's prompt sets them and its later steps keep them.
A forward that is not a generation (the teacher-forced loss, a multiple-choice continuation) sees
the whole row, so its weight is computed from the row as given, reference tokens included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedexperts.algorithms.feddpa.mixing import AdapterMix
from fedexperts.data.tokenize import IGNORE_INDEX
from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.precision import autocast_for

Representation = Literal["last", "mean"]

_ATTRIBUTE = "_fedexperts_dynamic_weighting"


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor, representation: Representation) -> torch.Tensor:
    """``[batch, hidden]`` from ``[batch, length, hidden]``: the last attended position's state, or their mean."""
    mask = attention_mask.to(hidden.device) > 0
    if representation == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(dim=-1)  # left or right padding alike
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def local_weights(states: torch.Tensor, references: torch.Tensor, max_weight: float) -> torch.Tensor:
    """``max_weight`` times each state's mean cosine similarity to the reference states: ``[batch]``."""
    similarity = F.cosine_similarity(states.float()[:, None, :], references.float()[None, :, :], dim=-1)
    return max_weight * similarity.mean(dim=-1)


def prompts(batches: Iterable[Mapping[str, torch.Tensor]], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts (tokens before the first supervised label) of the first ``count`` training rows, right-padded.

    Returns ``input_ids`` and ``attention_mask``; fewer rows when the batches hold fewer.
    """
    rows: list[torch.Tensor] = []
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            supervised = (labels != IGNORE_INDEX).nonzero()
            length = int(supervised[0]) if len(supervised) else int(mask.sum())
            rows.append(ids[: max(length, 1)])
            if len(rows) == count:
                break
        if len(rows) == count:
            break
    if not rows:
        raise FedExpertsError("feddpa: the client has no training rows to compare test examples with")
    width = max(len(row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def _starts_sequence(cache: Any) -> bool:
    """A forward without a key-value cache, or with an empty one (a generation's first step)."""
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    return callable(length) and int(length()) == 0


class DynamicWeighting:
    """Sets the adapter mix of each evaluation input from its representation (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        mix: AdapterMix,
        *,
        global_adapter: str,
        local_adapter: str,
        max_weight: float,
        representation: Representation,
    ) -> None:
        self.mix = mix
        self.global_adapter, self.local_adapter = global_adapter, local_adapter
        self.max_weight = max_weight
        self.representation: Representation = representation
        self.references: torch.Tensor | None = None
        """The current client's training-row states ``[instances, hidden]``; ``None``: no weighting (global only)."""
        self._busy = False
        unwrap_model(model).register_forward_pre_hook(self._before, with_kwargs=True)
        setattr(unwrap_model(model), _ATTRIBUTE, self)

    @torch.no_grad()
    def states(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Representations ``[batch, hidden]`` of these inputs, with the local adapter alone."""
        base = unwrap_model(model)
        self._busy = True
        try:
            with self.mix.fixed({self.global_adapter: 0.0, self.local_adapter: 1.0}), autocast_for(base):
                hidden = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._busy = False
        return pooled(hidden.last_hidden_state.float(), attention_mask, self.representation)

    def remember(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], count: int) -> None:
        """Represent the prompts of the client's first ``count`` training rows (its adapters loaded)."""
        input_ids, attention_mask = prompts(batches, count)
        device = next(unwrap_model(model).parameters()).device
        self.references = self.states(model, input_ids.to(device), attention_mask.to(device))

    def forget(self) -> None:
        """No client data (sizing on ``meta``): the global adapter alone."""
        self.references = None
        self.mix.reset()

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training or self._busy or self.references is None:
            return
        if not _starts_sequence(kwargs.get("cache", kwargs.get("past_key_values"))):  # transformers' v5 name, v4's
            return  # a generation step after the prompt keeps the prompt's weights
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise FedExpertsError("feddpa weighs each example by its input_ids; this forward has none")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weight = local_weights(self.states(module, input_ids, attention_mask), self.references, self.max_weight)
        self.mix.weights.update({self.global_adapter: 1 - weight, self.local_adapter: weight})


def dynamic_weighting(model: nn.Module) -> DynamicWeighting:
    """The :class:`DynamicWeighting` installed on ``model``."""
    weighting = getattr(unwrap_model(model), _ATTRIBUTE, None)
    if not isinstance(weighting, DynamicWeighting):
        raise FedExpertsError("this model has no dynamic weighting: prepare it with feddpa first")
    return weighting

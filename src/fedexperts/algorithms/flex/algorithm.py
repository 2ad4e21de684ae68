"""FLEx: federated LLMs with personalized experts (arXiv 2506.00965, v2 "expert grafting").

Every pretrained weight (routed and shared experts, routers, embeddings, norms) stays frozen. On
its first round each client scores, per MoE layer, how well each pretrained routed expert alone
reconstructs the full layer's output on its calibration tokens (:mod:`fedexperts.moe.selection`)
and grafts a copy of the best one as its personal expert, joined through a sigmoid gate that
starts as that expert's router row (:mod:`fedexperts.moe.personal`). The client trains its
personal experts, gates and the shared parameters (attention LoRA by default); only the shared
parameters are sent and averaged, personal experts and gates never leave the client. With
``personal_training="lora"`` (the official code's way) the grafted copies and gates stay frozen and
LoRA adapters on them are what trains and stays personal; ``gate_bias=False`` gives the gate no bias
(as the official gate).

Where the paper is silent, the choices are: calibration uses the client's first
``calibration_batches`` training batches (or as many as hold ``calibration_tokens`` real tokens) with
the received global LoRA applied and the grafts switched off (so ``Z`` is the pretrained layer), and
the losses are Lu et al.'s sum of per-batch norms (``criterion``; ``pooled`` is one norm over all
tokens); the gate gets a bias (``gate_bias``) started at the
router's bias (zero for routers without one). Beyond the paper: ``top_n`` grafts the n best experts
into the personal slots, ``refresh_every`` re-selects every K rounds (an expert whose choice did not
change keeps its trained values; a newly chosen one starts from its pretrained copy), and
``share_gate`` aggregates the gates as shared parameters.

One process serves many clients on one base model: :meth:`FLEx.prepare` grafts placeholder slots
(copies of experts ``0..n-1``) so every client's personal tensors have fixed names and shapes, and
each client's setup refills them with its own choice (:func:`fedexperts.moe.personal.regraft`) or
its saved values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.settings import SharedScope
from fedexperts.data.layout import batch_layout
from fedexperts.errors import FedExpertsError
from fedexperts.interface import ClientContext, LocalData, Payload
from fedexperts.moe.families import moe_layers, unwrap_model
from fedexperts.moe.params import ParamKind, Role, RoleRules
from fedexperts.moe.personal import (
    add_personal_lora,
    graft_personal_experts,
    grafts,
    regraft,
    set_grafted_experts,
    suspended_grafts,
)
from fedexperts.moe.selection import reconstruction_losses

GRAFTED_KEY = "grafted"
SELECTED_ROUND_KEY = "selected_round"


def flex_rules(scope: SharedScope, *, share_gate: bool, lora: bool = False) -> RoleRules:
    """The scope's parameters are shared; personal experts (and gates unless shared) are personal.

    With ``lora`` the grafted weights stay frozen and their LoRA adapters take those roles instead.
    """
    shared = scope_rules(scope)
    base, adapters = dict(shared.base), dict(shared.adapters)
    trained = adapters if lora else base
    trained[ParamKind.PERSONAL_EXPERT] = Role.PERSONAL
    trained[ParamKind.PERSONAL_GATE] = Role.SHARED if share_gate else Role.PERSONAL
    return RoleRules(base=base, adapters=adapters)


@dataclass
class FLExContext(ClientContext):
    selected_round: int = 1
    """Round of this client's last grafting choice (kept in its personal state)."""
    grafted: dict[str, tuple[int, ...]] | None = None
    """The experts in this client's personal slots once it is set up (read back from the context, not the
    model: batched clients share one model, which holds the last set-up client's choice)."""


class FLEx(BaseAlgorithm):
    name = "flex"

    def __init__(
        self, config: FlexConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FlexConfig()
        options = config.flex
        self.personal_lora = options.personal_lora if options.personal_training == "lora" else None
        rules = flex_rules(config.scope, share_gate=options.share_gate, lora=self.personal_lora is not None)
        super().__init__(rules, lora=config.lora_or_none, server=config.server)
        self.top_n = options.top_n
        self.refresh_every = options.refresh_every
        self.calibration_batches = options.calibration_batches
        self.calibration_tokens = options.calibration_tokens
        self.criterion = options.criterion
        self.gate_bias = options.gate_bias

    @property
    def batching_refusal(self) -> str | None:
        if self.personal_lora is not None:
            return "flex with personal_training=lora reads the grafted copies inside its fused LoRA, not by row group"
        return super().batching_refusal

    def prepare(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        layers = moe_layers(base)
        too_few = [layer.name for layer in layers if layer.num_experts < self.top_n]
        if too_few:
            raise FedExpertsError(f"flex: top_n={self.top_n} exceeds the experts of {too_few[0]}")
        graft_personal_experts(
            base, {layer.name: list(range(self.top_n)) for layer in layers}, gate_bias=self.gate_bias
        )
        if self.personal_lora is not None:
            lora = self.personal_lora
            add_personal_lora(base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
        super().prepare(model)

    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> FLExContext:
        self._load_shared_and_personal(model, received, personal)
        base = cast(PreTrainedModel, unwrap_model(model))
        context = FLExContext(data.client, model, received, data.round)
        if personal is not None and self.personal_lora is not None:
            # only the adapters were kept: the frozen copies are refilled from the pretrained experts
            regraft(base, personal.metadata[GRAFTED_KEY], reset_adapters=False)
        elif personal is not None:
            set_grafted_experts(base, personal.metadata[GRAFTED_KEY])
        if personal is not None:
            context.selected_round = int(personal.metadata.get(SELECTED_ROUND_KEY, 1))
        if data.batches is not None:  # else nothing to calibrate on (sizing on the meta device): placeholders stay
            due = personal is None or (
                self.refresh_every > 0 and data.round - context.selected_round >= self.refresh_every
            )
            if due:
                self._select(base, data.batches, keep_trained=personal is not None)
                context.selected_round = data.round
        context.grafted = grafted_experts(base)
        return context

    def _select(
        self, model: PreTrainedModel, batches: Callable[[], Iterator[dict[str, torch.Tensor]]], *, keep_trained: bool
    ) -> None:
        """Score every routed expert against the pretrained layer output and graft the best ``top_n``."""
        with suspended_grafts(model):
            device = next(model.parameters()).device
            chosen = (
                islice(batches(), self.calibration_batches)
                if self.calibration_tokens is None
                else _until_tokens(batches(), self.calibration_tokens)
            )
            choices = reconstruction_losses(model, _inputs(model, chosen, device), criterion=self.criterion)
        current = {name: graft.experts for name, graft in grafts(model).items()}
        wanted = {name: tuple(choice.top(self.top_n)) for name, choice in choices.items()}
        changed = {name: list(chosen) for name, chosen in wanted.items() if not keep_trained or chosen != current[name]}
        if changed:
            regraft(model, changed)

    def personal_state(self, context: ClientContext) -> Payload | None:
        state = super().personal_state(context)
        chosen = context.grafted if isinstance(context, FLExContext) else None
        grafted = {name: list(experts) for name, experts in (chosen or grafted_experts(context.model)).items()}
        tensors = state.tensors if state is not None else {}
        selected = context.selected_round if isinstance(context, FLExContext) else 1
        return Payload(tensors, {GRAFTED_KEY: grafted, SELECTED_ROUND_KEY: selected})


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the attention mask keeps (every input id when there is no mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _until_tokens(batches: Iterable[dict[str, torch.Tensor]], tokens: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first batches, up to and including the one that brings the real-token count to ``tokens``."""
    seen = 0
    for batch in batches:
        yield batch
        seen += real_tokens(batch)
        if seen >= tokens:
            return


def _inputs(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Calibration batches as the model's forward inputs, on its device (an encoder-decoder's decoder
    reads the responses: :meth:`~fedexperts.data.layout.BatchLayout.model_inputs`)."""
    layout = batch_layout(model)
    for batch in batches:
        yield layout.model_inputs(model, {key: value.to(device) for key, value in batch.items()})


def grafted_experts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Which pretrained experts fill each layer's personal slots right now."""
    return {name: graft.experts for name, graft in grafts(cast(PreTrainedModel, unwrap_model(model))).items()}

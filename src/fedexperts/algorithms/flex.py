"""FLEx: federated LLMs with personalized experts (arXiv 2506.00965, v2 "expert grafting").

Every pretrained weight (routed and shared experts, routers, embeddings, norms) stays frozen. On
its first round each client scores, per MoE layer, how well each pretrained routed expert alone
reconstructs the full layer's output on its calibration tokens (:mod:`fedexperts.moe.selection`)
and grafts a copy of the best one as its personal expert, joined through a sigmoid gate that
starts as that expert's router row (:mod:`fedexperts.moe.personal`). The client trains its
personal experts, gates and the shared parameters (attention LoRA by default); only the shared
parameters are sent and averaged, personal experts and gates never leave the client.

Where the paper is silent, the choices are: calibration uses the client's first
``calibration_batches`` training batches with the received global LoRA applied and the grafts
switched off (so ``Z`` is the pretrained layer); the gate gets a trainable bias started at the
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

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.algorithms.aggregation import ServerOptimizer
from fedexperts.algorithms.base import Algorithm, LocalData, LoraSettings, SharedScope, scope_rules
from fedexperts.errors import FedExpertsError
from fedexperts.federation.payload import Payload
from fedexperts.moe.families import moe_layers, unwrap_model
from fedexperts.moe.params import ParamKind, Role, RoleRules
from fedexperts.moe.personal import graft_personal_experts, grafts, regraft, set_grafted_experts, suspended_grafts
from fedexperts.moe.selection import reconstruction_losses

GRAFTED_KEY = "grafted"
SELECTED_ROUND_KEY = "selected_round"


def flex_rules(scope: SharedScope, *, share_gate: bool) -> RoleRules:
    """The scope's parameters are shared; personal experts (and gates unless shared) are personal."""
    shared = scope_rules(scope)
    base = dict(shared.base)
    base[ParamKind.PERSONAL_EXPERT] = Role.PERSONAL
    base[ParamKind.PERSONAL_GATE] = Role.SHARED if share_gate else Role.PERSONAL
    return RoleRules(base=base, adapters=dict(shared.adapters))


class FLEx(Algorithm):
    name = "flex"

    def __init__(
        self,
        scope: SharedScope = SharedScope.ATTENTION_LORA,
        *,
        lora: LoraSettings | None = None,
        server: ServerOptimizer | None = None,
        top_n: int = 1,
        refresh_every: int = 0,
        share_gate: bool = False,
        calibration_batches: int = 4,
    ) -> None:
        if scope is SharedScope.EVERYTHING:
            raise FedExpertsError("flex: scope 'everything' would share the frozen experts; use attention-lora")
        if scope is SharedScope.ATTENTION_LORA and lora is None:
            lora = LoraSettings()
        if top_n < 1 or refresh_every < 0 or calibration_batches < 1:
            raise FedExpertsError(
                f"flex: top_n ({top_n}) and calibration_batches ({calibration_batches}) must be >= 1, "
                f"refresh_every ({refresh_every}) >= 0"
            )
        super().__init__(flex_rules(scope, share_gate=share_gate), lora=lora, server=server)
        self.top_n = top_n
        self.refresh_every = refresh_every
        self.calibration_batches = calibration_batches
        self._selected_round = 1
        """Round of the current client's last grafting choice (per client: saved in its personal state)."""

    def prepare(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        layers = moe_layers(base)
        too_few = [layer.name for layer in layers if layer.num_experts < self.top_n]
        if too_few:
            raise FedExpertsError(f"flex: top_n={self.top_n} exceeds the experts of {too_few[0]}")
        graft_personal_experts(base, {layer.name: list(range(self.top_n)) for layer in layers})
        super().prepare(model)

    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData | None = None
    ) -> nn.Module:
        self._load_shared_and_personal(model, received, personal)
        base = cast(PreTrainedModel, unwrap_model(model))
        if personal is not None:
            set_grafted_experts(base, personal.metadata[GRAFTED_KEY])
            self._selected_round = int(personal.metadata.get(SELECTED_ROUND_KEY, 1))
        if data is None:
            return model  # nothing to calibrate on (sizing on the meta device): the placeholder slots stay
        due = personal is None or (self.refresh_every > 0 and data.round - self._selected_round >= self.refresh_every)
        if due:
            self._select(base, data, keep_trained=personal is not None)
            self._selected_round = data.round
        return model

    def _select(self, model: PreTrainedModel, data: LocalData, *, keep_trained: bool) -> None:
        """Score every routed expert against the pretrained layer output and graft the best ``top_n``."""
        with suspended_grafts(model):
            device = next(model.parameters()).device
            choices = reconstruction_losses(model, _inputs(islice(data.batches(), self.calibration_batches), device))
        current = {name: graft.experts for name, graft in grafts(model).items()}
        wanted = {name: tuple(choice.top(self.top_n)) for name, choice in choices.items()}
        changed = {name: list(chosen) for name, chosen in wanted.items() if not keep_trained or chosen != current[name]}
        if changed:
            regraft(model, changed)

    def personal_state(self, model: nn.Module) -> Payload | None:
        state = super().personal_state(model)
        grafted = {
            name: list(graft.experts) for name, graft in grafts(cast(PreTrainedModel, unwrap_model(model))).items()
        }
        tensors = state.tensors if state is not None else {}
        return Payload(tensors, {GRAFTED_KEY: grafted, SELECTED_ROUND_KEY: self._selected_round})


def _inputs(batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Calibration batches without labels (the selection runs a plain forward), on the model's device."""
    for batch in batches:
        yield {key: value.to(device) for key, value in batch.items() if key != "labels"}


def grafted_experts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Which pretrained experts fill each layer's personal slots right now."""
    return {name: graft.experts for name, graft in grafts(cast(PreTrainedModel, unwrap_model(model))).items()}

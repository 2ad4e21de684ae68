"""FedDPA: federated dual-personalizing adapter (Yang et al., "Dual-Personalizing Adapter for Federated
Foundation Models", NeurIPS 2024, arXiv 2403.19211; code: GitHub ``Lydia-yang/FedDPA``).

Each client holds two attention LoRA adapters on the frozen model: a global one (peft's
``default``; sent and averaged, example-weighted, like FedAvg's LoRA) and a local one (``local``;
kept in the client's personal state, never sent). Training follows the official code's
iterative scheme (FedDPA-T): from round ``feddpa.local_from_round`` on, a client first trains its
local adapter with the received global adapter frozen and both outputs mixed
(``local_phase_global_weight`` and one minus it), then trains the global adapter alone, which it
sends; before that round only the global adapter trains. A client's local adapter starts as a
copy of the global adapter it receives in the round it first trains it (our reading of the code's
``add_local_model`` with no saved adapter, a function the released code does not include), so an
untrained local adapter leaves the model equal to the global one.

At inference every example gets its own mix (:mod:`.weighting`): ``W0 x + (1 - l) B_g A_g x + l B_l A_l x``
with ``l`` from its similarity to the client's training rows. peft holds both adapters (both
active, one ``inject_adapter_in_model`` each); the per-example weights are fedexperts' own
forward hooks (:mod:`.mixing`), since peft mixes adapters by a fixed scalar only. Decoder-only
models only: an encoder-decoder's generation feeds the decoder without ``input_ids`` to weigh.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import peft
import torch
from torch import nn

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.feddpa.config import FedDPAConfig
from fedexperts.algorithms.feddpa.mixing import AdapterMix, adapter_mix
from fedexperts.algorithms.feddpa.weighting import DynamicWeighting, dynamic_weighting
from fedexperts.algorithms.lora import DEFAULT_ADAPTER, lora_layers, lora_tensors
from fedexperts.algorithms.settings import SharedScope
from fedexperts.errors import FedExpertsError
from fedexperts.interface import ClientContext, LocalData, Payload
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.params import Role, apply_roles

GLOBAL = DEFAULT_ADAPTER
LOCAL = "local"
TRAINED_KEY = "local_trained"
"""Personal-state metadata: the local adapter has trained (else it is a stale copy of an earlier global one)."""


class FedDPA(BaseAlgorithm):
    name = "feddpa"

    def __init__(
        self, config: FedDPAConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FedDPAConfig()
        super().__init__(scope_rules(SharedScope.ATTENTION_LORA), lora=config.lora, server=config.server)
        self.options = config.feddpa
        self.twins: dict[str, str] = {}
        """Local-adapter tensor name -> the global-adapter tensor of the same layer and factor (set by prepare)."""

    @property
    def batching_refusal(self) -> str | None:
        return "feddpa trains its two adapters in turn (training phases), which row groups of one batch do not follow"

    def _inject_lora(self, model: nn.Module) -> None:
        if getattr(unwrap_model(model).config, "is_encoder_decoder", False):
            raise FedExpertsError(
                "feddpa supports decoder-only models: it weighs its adapters per example in the forward that "
                "reads the prompt, and an encoder-decoder's generation runs the encoder apart from that forward"
            )
        config = self._peft_config(model)  # before injecting: the adapters' own linears are no targets
        peft.inject_adapter_in_model(config, model, adapter_name=GLOBAL)
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            peft.inject_adapter_in_model(copy.deepcopy(config), model, adapter_name=LOCAL)
        for _name, layer in lora_layers(model):
            layer.set_adapter([GLOBAL, LOCAL])  # both active; the roles set what trains
            device = next(layer.lora_A[GLOBAL].parameters()).device  # a meta base: peft left LOCAL on the CPU
            layer.lora_A[LOCAL].to(device)
            layer.lora_B[LOCAL].to(device)
        mix = AdapterMix(model, {GLOBAL: 1.0, LOCAL: 0.0})
        options = self.options
        DynamicWeighting(
            model,
            mix,
            global_adapter=GLOBAL,
            local_adapter=LOCAL,
            max_weight=options.max_weight,
            representation=options.representation,
        )

    def _assign_roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super()._assign_roles(model)
        for name, tensor in lora_tensors(model).items():
            if tensor.adapter == LOCAL:
                roles[name] = Role.PERSONAL
        return roles

    def _learn(self, model: nn.Module) -> None:
        tensors = lora_tensors(model)
        by_place = {(t.layer, t.factor): name for name, t in tensors.items() if t.adapter == GLOBAL}
        self.twins = {name: by_place[(t.layer, t.factor)] for name, t in tensors.items() if t.adapter == LOCAL}

    @torch.no_grad()
    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> ClientContext:
        self._load_shared_and_personal(model, received, personal)
        if personal is None or not personal.metadata.get(TRAINED_KEY, False):  # the local adapter starts as the global
            parameters = dict(unwrap_model(model).named_parameters())
            for local, shared in self.twins.items():
                parameters[local].copy_(parameters[shared])
        weighting = dynamic_weighting(model)
        weighting.forget()
        if data.batches is not None:
            weighting.remember(model, data.batches(), self.options.instances)
        return ClientContext(data.client, model, received, data.round)

    def _trains_local(self, context: ClientContext) -> bool:
        return context.round >= self.options.local_from_round

    def training_phases(self, context: ClientContext) -> Sequence[AbstractContextManager[object]]:
        mixed = self.options.local_phase_global_weight
        global_phase = self._phase(context.model, Role.SHARED, {GLOBAL: 1.0, LOCAL: 0.0})
        if not self._trains_local(context):
            return (global_phase,)
        return self._phase(context.model, Role.PERSONAL, {GLOBAL: mixed, LOCAL: 1.0 - mixed}), global_phase

    @contextmanager
    def _phase(self, model: nn.Module, role: Role, weights: dict[str, float]) -> Iterator[None]:
        """Only the tensors of ``role`` (the global or the local adapter) train, under these adapter weights."""
        trained = self._params(model, role)
        for name, parameter in unwrap_model(model).named_parameters():
            if self.roles[name] is not Role.FROZEN:
                parameter.requires_grad_(name in trained)
        try:
            with adapter_mix(model).fixed(weights):
                yield
        finally:
            apply_roles(model, self.roles)

    def personal_state(self, context: ClientContext) -> Payload | None:
        """The local adapter, and whether it has trained (until it has, each round restarts it from the global one)."""
        state = super().personal_state(context)
        tensors = state.tensors if state is not None else {}
        return Payload(tensors, {TRAINED_KEY: self._trains_local(context)})

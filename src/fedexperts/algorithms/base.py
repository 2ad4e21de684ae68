"""Role-based algorithms: the common implementation of :class:`fedexperts.interface.Algorithm`.

A :class:`BaseAlgorithm` is prepared once per process on the loaded base model (e.g. attention
LoRA is injected in place), then, for every client it is handed to, it fills the trainable tensors
from what the client received (shared) and what the client kept (personal), says what goes back,
and aggregates replies on the server. Runtimes only move payloads around and never special-case
an algorithm.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import peft
import torch
from torch import nn

from fedexperts.algorithms.aggregation import ServerOptimizer, weighted_average
from fedexperts.algorithms.expert_weighting import EXPERT_TOKENS_KEY, keep_rows, reported_tokens, token_weighted_average
from fedexperts.algorithms.settings import ExpertWeighting, LoraConfig, ServerConfig, SharedScope
from fedexperts.errors import FedExpertsError
from fedexperts.interface import (
    EXAMPLES_KEY,
    ClientContext,
    ClientInfo,
    ClientUpdate,
    LocalData,
    Payload,
    ProximalTerm,
    State,
    validate_update,
)
from fedexperts.moe.families import family_for, moe_layers, unwrap_model
from fedexperts.moe.params import ExpertSlot, ParamKind, Role, RoleRules, apply_roles, expert_slots, parameter_roles
from fedexperts.moe.precision import float32_masters, master_copy
from fedexperts.moe.rows import full_model_names, unheld_expert_modules

_NON_EXPERT = (
    ParamKind.ATTENTION,
    ParamKind.EMBEDDING,
    ParamKind.LM_HEAD,
    ParamKind.DENSE_MLP,
    ParamKind.ROUTER,
    ParamKind.SHARED_EXPERT,
    ParamKind.OTHER,
)


def scope_rules(scope: SharedScope, role: Role = Role.SHARED) -> RoleRules:
    """Role rules that give ``role`` to the parameters of ``scope`` and freeze the rest."""
    if scope is SharedScope.ATTENTION_LORA:
        return RoleRules(adapters={ParamKind.ATTENTION: role})
    if scope is SharedScope.ATTENTION:
        return RoleRules(base={ParamKind.ATTENTION: role})
    trainable = tuple(
        kind for kind in ParamKind if kind is not ParamKind.NON_TEXT
    )  # a wrapper's vision tower never trains
    kinds = _NON_EXPERT if scope is SharedScope.NON_EXPERT else trainable
    return RoleRules(base=dict.fromkeys(kinds, role))


def attention_linear_names(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` modules inside attention modules (LoRA targets, by structure).

    In hybrid models the token mixer of a layer may be linear attention, Mamba or a short convolution
    (:attr:`~fedexperts.moe.MoEFamily.attention_attrs`); their linears are adapted too, except those
    a fused kernel reads by weight (:attr:`~fedexperts.moe.MoEFamily.lora_excluded`). ``targets``
    keeps only the modules whose last name segment is one of them (``q_proj``); a target that names
    no attention linear of this model is an error.
    """
    base = unwrap_model(model)
    family = family_for(base)
    layers = [layer for _stack, _prefix, stack in family.stacks(base) for layer in stack]
    attention = {id(module) for layer in layers for module in family.attention_modules(layer)}
    excluded = {id(module) for layer in layers for module in family.lora_excluded_modules(layer)}
    names: list[str] = []
    for name, module in base.named_modules():
        if id(module) in attention:
            names.extend(
                f"{name}.{child}"
                for child, sub in module.named_modules()
                if isinstance(sub, nn.Linear)
                and id(sub) not in excluded
                and child.split(".", 1)[0] not in family.attention_skip
            )
    if targets is None:
        return names
    found = {name.rsplit(".", 1)[-1] for name in names}
    missing = [target for target in targets if target not in found]
    if missing:
        raise FedExpertsError(
            f"algorithm.lora.targets {missing} match no attention linear of {family.model_type}; it has {sorted(found)}"
        )
    return [name for name in names if name.rsplit(".", 1)[-1] in targets]


_CLIENT_MODEL = "_fedexperts_client_model"


def is_client_model(model: nn.Module) -> bool:
    """Whether :meth:`BaseAlgorithm.prepare_client_model` built ``model`` for one client step (not the shared base)."""
    return bool(getattr(unwrap_model(model), _CLIENT_MODEL, False))


class BaseAlgorithm:
    """Behaviour shared by every algorithm; subclasses choose roles and override hooks.

    The model is prepared once (:meth:`prepare`). Per client: :meth:`setup_client` loads the
    trainable tensors and returns the client's :class:`ClientContext`, training runs,
    :meth:`uplink` and :meth:`personal_state` read them back. Tensors of a role are the model's own
    parameter names (with peft's LoRA segments). Nothing per client is stored on ``self``.
    """

    name = "base"
    client_sub_moes = False
    """Whether :meth:`client_experts` may name a subset of the experts (a node then never needs the full model)."""

    def __init__(
        self,
        rules: RoleRules,
        *,
        lora: LoraConfig | None = None,
        server: ServerConfig | None = None,
        expert_weighting: ExpertWeighting = ExpertWeighting.EXAMPLES,
    ) -> None:
        self.rules = rules
        self.lora = lora
        self.server = ServerOptimizer(server or ServerConfig())
        self.weighs_tokens = expert_weighting is ExpertWeighting.TOKENS
        """Routed experts are averaged by the tokens clients routed to them (``algorithm.expert_weighting``)."""
        self.expert_slots: dict[str, ExpertSlot] = {}
        """With :attr:`weighs_tokens`: the shared tensors that hold routed experts (set by :meth:`prepare`)."""
        self.expert_counts: dict[str, int] = {}
        """With :attr:`weighs_tokens`: each MoE layer's expert count, the length of its reported token counts."""
        self.roles: dict[str, Role] = {}
        self._initial_personal: State = {}
        self._by_role: weakref.WeakKeyDictionary[nn.Module, dict[Role, dict[str, nn.Parameter]]] = (
            weakref.WeakKeyDictionary()
        )

    # -- once per process --------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Inject LoRA (if any) in place, assign roles, and remember the personal tensors' start.

        What trains then becomes a float32 master copy (:func:`~fedexperts.moe.precision.float32_masters`)
        whatever the base's dtype: AdamW's small updates would round away in bf16.
        """
        self._inject_lora(model)
        self.roles = self._assign_roles(model)
        self._by_role.clear()
        apply_roles(model, self.roles)
        if not any(role is not Role.FROZEN for role in self.roles.values()):
            raise FedExpertsError(f"{self.name}: no parameter is trainable under these roles")
        self._learn(model)
        self._settle_base(model)
        float32_masters(model)
        self._initial_personal = {
            name: param.detach().clone() for name, param in self._params(model, Role.PERSONAL).items()
        }
        if self.weighs_tokens:
            self._learn_expert_slots(model)

    def _learn_expert_slots(self, model: nn.Module) -> None:
        """Which shared tensors hold routed experts, for ``expert_weighting = "tokens"`` (none is an error)."""
        base = unwrap_model(model)
        self.expert_counts = {layer.name: layer.num_experts for layer in moe_layers(base)}
        self.expert_slots = self._shared_expert_slots(model)
        if not self.expert_slots:
            raise FedExpertsError(
                f"{self.name}: algorithm.expert_weighting 'tokens' needs shared routed experts or routers, "
                "and none is shared"
            )

    def _shared_expert_slots(self, model: nn.Module) -> dict[str, ExpertSlot]:
        """The global state's tensors that hold routed experts (default: the shared ones :func:`expert_slots` names)."""
        shared = self._params(model, Role.SHARED)
        return {name: slot for name, slot in expert_slots(model).items() if name in shared}

    def _inject_lora(self, model: nn.Module) -> None:
        if self.lora is not None:
            peft.inject_adapter_in_model(self._peft_config(model), model)

    def _peft_config(self, model: nn.Module) -> peft.LoraConfig:
        """peft's config of the attention LoRA (``self.lora``) on ``model``'s attention linears."""
        if self.lora is None:
            raise FedExpertsError(f"{self.name}: this algorithm has no LoRA settings")
        return peft.LoraConfig(
            r=self.lora.rank,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=attention_linear_names(model, self.lora.targets),
        )

    def _assign_roles(self, model: nn.Module) -> dict[str, Role]:
        """Every parameter's role, once LoRA is in (default: by kind, :attr:`rules`).

        A subclass refines it below the kind: FedSA-LoRA keeps LoRA's B factors personal, FFA-LoRA
        freezes the A factors (:mod:`fedexperts.algorithms.lora`).
        """
        return parameter_roles(model, self.rules)

    def _learn(self, model: nn.Module) -> None:
        """What a subclass reads of the prepared base once, before anything becomes float32 (default: nothing).

        FedMoE learns its layout here (sizes in the checkpoint's dtype).
        """

    def _settle_base(self, model: nn.Module) -> None:
        """A subclass's last change to the trainable set before it becomes float32 (default: none).

        Runs on the base and on every client model :meth:`prepare_client_model` builds. FedMoE
        freezes its expert rows here: the base keeps them in the checkpoint's dtype and each
        client's sub-MoE trains float32 copies of the rows it holds.
        """

    def prepare_client_model(self, model: nn.Module) -> None:
        """Give a client model loaded apart from the base (a sub-MoE) the base's preparation, learning nothing.

        The same LoRA injection, roles, freezing and float32 masters as :meth:`prepare`; the roles
        are the ones learnt there, so the model must have exactly the base's parameter names (where
        experts are modules, Switch: those of the experts it holds, each under its global index).
        """
        if not self.roles:
            raise FedExpertsError(f"{self.name}: prepare(model) must run before client models are built")
        self._inject_lora(model)
        base = unwrap_model(model)
        full_names = full_model_names(base)  # a kept expert module is read under its global expert's name
        names = {name: full_names.get(name, name) for name, _ in base.named_parameters()}
        unheld = unheld_expert_modules(base)
        expected = {name for name in self.roles if not name.startswith(unheld)}
        if set(names.values()) != expected:
            strays = sorted(set(names.values()) ^ expected)
            raise FedExpertsError(f"{self.name}: the client model's parameters differ from the base's: {strays[:3]}")
        apply_roles(model, {name: self.roles[full] for name, full in names.items()})
        self._settle_base(model)
        float32_masters(model)
        setattr(unwrap_model(model), _CLIENT_MODEL, True)

    def initial_global_state(self, model: nn.Module) -> State:
        """Copies of the shared tensors, float32 where the model holds them in a half dtype."""
        return {name: master_copy(param) for name, param in self._params(model, Role.SHARED).items()}

    # -- per client ----------------------------------------------------------------------------------
    def client_experts(self, received: Payload) -> dict[str, list[int]] | None:
        """The experts the model for this downlink must hold, per MoE layer (global indices).

        ``None`` (the default): the client works on the shared base model itself.
        """
        return None

    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        """What a client receives this round (default: the whole shared state)."""
        return Payload(dict(global_state))

    @torch.no_grad()
    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> ClientContext:
        """Load received shared tensors and the client's personal ones (or their start values).

        The context's model is the one the client trains and evaluates: ``model`` itself here; an
        algorithm may give another view of it (FedMoE: the client's sub-MoE).
        """
        self._load_shared_and_personal(model, received, personal)
        return ClientContext(data.client, model, received, data.round)

    @torch.no_grad()
    def _load_shared_and_personal(self, model: nn.Module, received: Payload, personal: Payload | None) -> None:
        for name, param in self._params(model, Role.SHARED).items():
            if name not in received.tensors:
                raise FedExpertsError(f"{self.name}: the client did not receive shared tensor {name}")
            param.copy_(received.tensors[name])
        kept = personal.tensors if personal is not None else {}
        for name, param in self._params(model, Role.PERSONAL).items():
            param.copy_(kept.get(name, self._initial_personal[name]))

    def proximal_term(self, context: ClientContext) -> ProximalTerm | None:
        """An extra local loss term (FedProx); none by default."""
        return None

    def training_phases(self, context: ClientContext) -> Sequence[AbstractContextManager[object]]:
        """One local training run over every trainable parameter (FedDPA trains two adapters in turn)."""
        return (nullcontext(),)

    def uplink(self, context: ClientContext) -> Payload:
        tensors = {name: param.detach().clone() for name, param in self._params(context.model, Role.SHARED).items()}
        return Payload(tensors, {EXAMPLES_KEY: context.client.num_examples, **self._tokens_metadata(context)})

    @property
    def batching_refusal(self) -> str | None:
        """Clients of role-based algorithms batch, unless experts are weighed by each client's routed tokens."""
        if self.weighs_tokens:
            return "algorithm.expert_weighting=tokens counts each client's routed tokens, which one batch does not"
        return None

    @property
    def counts_routing(self) -> bool:
        """Whether the runtime counts the tokens routed to each expert in local training (:attr:`weighs_tokens`)."""
        return self.weighs_tokens

    def _tokens_metadata(self, context: ClientContext) -> dict[str, Any]:
        """The routed-token counts the runtime recorded, when experts are weighed by them (else nothing)."""
        if not self.weighs_tokens or context.routed_tokens is None:
            return {}
        return {EXPERT_TOKENS_KEY: context.routed_tokens}

    def personal_state(self, context: ClientContext) -> Payload | None:
        personal = self._params(context.model, Role.PERSONAL)
        tensors = {name: param.detach().clone() for name, param in personal.items()}
        return Payload(tensors) if tensors else None

    # -- server --------------------------------------------------------------------------------------
    def server_state(self) -> Payload:
        """What the server must checkpoint besides the global state (default: server-optimizer moments)."""
        return Payload(self.server.state())

    def load_server_state(self, state: Payload) -> None:
        self.server.load_state(state.tensors)

    def finish(self) -> None:
        """After the last round, before the final evaluation: nothing to settle by default."""

    def check_update(self, update: Payload, global_state: State, client: ClientInfo) -> None:
        """Refuse (``PayloadError``) an update whose keys, shapes, dtypes or values the server cannot average."""
        validate_update(update, global_state, sender=client.client_id)
        if self.weighs_tokens:
            reported_tokens(update.metadata, self.expert_counts, sender=client.client_id)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Example-weighted average of the shared tensors, applied by the server optimizer.

        With :attr:`weighs_tokens` each routed expert is averaged by the tokens clients routed to it, and one
        nobody routed to keeps its value (:mod:`~fedexperts.algorithms.expert_weighting`).
        """
        if not updates:
            return dict(global_state)
        if not self.weighs_tokens:
            averaged = weighted_average([(u.payload.tensors, float(u.client.num_examples)) for u in updates])
            return self.server.step(global_state, averaged)
        replies = [
            (
                u.payload.tensors,
                float(u.client.num_examples),
                reported_tokens(u.payload.metadata, self.expert_counts, sender=u.client.client_id),
            )
            for u in updates
        ]
        slots = {name: slot for name, slot in self.expert_slots.items() if name in global_state}
        averaged, unrouted = token_weighted_average(global_state, replies, slots)
        return keep_rows(global_state, self.server.step(global_state, averaged), unrouted)

    def privacy_spent(self) -> dict[str, Any] | None:
        """No differential privacy of its own: :mod:`fedexperts.algorithms.privacy` wraps an algorithm for that."""
        return None

    def _params(self, model: nn.Module, role: Role) -> dict[str, nn.Parameter]:
        if not self.roles:
            raise FedExpertsError(f"{self.name}: prepare(model) must run before clients are built")
        base = unwrap_model(model)
        cached = self._by_role.get(base)
        if cached is None:  # one walk over the model's parameters per model object, not one per client call
            cached = {each: {} for each in Role}
            for name, param in base.named_parameters():
                assigned = self.roles.get(name)
                if assigned is not None:
                    cached[assigned][name] = param
            self._by_role[base] = cached
        return dict(cached[role])

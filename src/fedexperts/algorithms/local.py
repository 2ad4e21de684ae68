"""Local-only training: every client trains its own copy of the scope and nothing is communicated."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedexperts.algorithms.aggregation import State
from fedexperts.algorithms.base import Algorithm, ClientInfo, ClientUpdate, LoraSettings, SharedScope, scope_rules
from fedexperts.federation.payload import Payload
from fedexperts.moe.params import Role


class LocalOnly(Algorithm):
    name = "local"

    def __init__(self, scope: SharedScope = SharedScope.ATTENTION_LORA, *, lora: LoraSettings | None = None) -> None:
        if scope is SharedScope.ATTENTION_LORA and lora is None:
            lora = LoraSettings()
        super().__init__(scope_rules(scope, Role.PERSONAL), lora=lora)

    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        return Payload({})

    def uplink(self, model: nn.Module, client: ClientInfo) -> Payload:
        return Payload({}, {"examples": client.num_examples})

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return dict(global_state)

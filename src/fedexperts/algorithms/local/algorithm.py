"""Local-only training: every client trains its own copy of the scope and nothing is communicated."""

from __future__ import annotations

from collections.abc import Sequence

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.local.config import LocalConfig
from fedexperts.interface import EXAMPLES_KEY, ClientContext, ClientInfo, ClientUpdate, Payload, State
from fedexperts.moe.params import Role


class LocalOnly(BaseAlgorithm):
    name = "local"

    def __init__(
        self, config: LocalConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or LocalConfig()
        super().__init__(scope_rules(config.scope, Role.PERSONAL), lora=config.lora_or_none)

    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        return Payload({})

    def uplink(self, context: ClientContext) -> Payload:
        return Payload({}, {EXAMPLES_KEY: context.client.num_examples})

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return dict(global_state)

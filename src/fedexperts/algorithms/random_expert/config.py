"""Settings of FLEx's own baseline: FedAvg of attention LoRA plus one random routed expert per layer."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, ExpertWeightingSettings, LoraConfig, ServerConfig


class RandomExpertConfig(ExpertWeightingSettings, AlgorithmSettings):
    """Always attention LoRA (the FLEx code's baseline); the chosen expert rows are shared too, or personal."""

    name: Literal["random-expert"] = "random-expert"
    builder: ClassVar[str] = "fedexperts.algorithms.random_expert.algorithm:RandomExpert"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    personal: bool = False
    """Keep the chosen expert rows on each client (personal: never sent, a client's next round starts
    from its own trained rows, a new client from the pretrained ones) while attention LoRA is still
    averaged. FLEx's code excludes its random experts from aggregation (it trains LoRA on them, and
    restarts them from the untrained adapter every round); ``False`` shares and averages the rows."""

    def unshared_experts(self) -> str | None:
        return "with personal = true the chosen experts are never sent" if self.personal else None

"""Settings of FLEx's own baseline: FedAvg of attention LoRA plus one random routed expert per layer."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, LoraConfig, ServerConfig


class RandomExpertConfig(AlgorithmSettings):
    """Always attention LoRA (the FLEx code's baseline); the chosen expert rows are shared too."""

    name: Literal["random-expert"] = "random-expert"
    builder: ClassVar[str] = "fedexperts.algorithms.random_expert.algorithm:RandomExpert"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

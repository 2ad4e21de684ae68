"""Settings of FedSA-LoRA (arXiv 2410.01463): attention LoRA and the server rule applied to the averaged A."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, LoraConfig, ServerConfig


class FedSALoRAConfig(AlgorithmSettings):
    """Always attention LoRA: both factors train, only A is sent. The official scripts use r=8, alpha=16,
    dropout 0.05 (``algorithm.lora.dropout=0.05``; the default here is 0, as for every LoRA algorithm)."""

    name: Literal["fedsa-lora"] = "fedsa-lora"
    builder: ClassVar[str] = "fedexperts.algorithms.fedsa_lora.algorithm:FedSALoRA"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Applied to the averaged A matrices (the paper: plain FedAvg)."""

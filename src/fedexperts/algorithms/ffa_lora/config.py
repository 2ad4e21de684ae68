"""Settings of FFA-LoRA (arXiv 2403.12313): attention LoRA whose A stays frozen, and the server rule for B."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, LoraConfig, ServerConfig


class FFALoRAConfig(AlgorithmSettings):
    """Always attention LoRA: A is frozen at its init, B trains and is sent (half of LoRA's bytes at equal rank).

    With A fixed, ``alpha`` only scales B's update, like a learning-rate factor: the paper reports
    FFA-LoRA steady over a wide range of ``alpha`` and trains it with larger learning rates than
    LoRA. The defaults are every LoRA algorithm's (r=8, alpha=16), so a comparison with ``fedavg``
    runs at equal settings; raise ``algorithm.lora.alpha`` or ``train.learning_rate`` to follow it.
    """

    name: Literal["ffa-lora"] = "ffa-lora"
    builder: ClassVar[str] = "fedexperts.algorithms.ffa_lora.algorithm:FFALoRA"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Applied to the averaged B matrices (the paper: plain FedAvg)."""

"""Settings of FedDPA (arXiv 2403.19211): the two adapters' LoRA, the training schedule and the dynamic weighting."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, LoraConfig, Section, ServerConfig


class FedDPAOptions(Section):
    """Defaults are the official code's (GitHub ``Lydia-yang/FedDPA``, ``main.py`` and ``GlobalModel_generated.py``)."""

    local_from_round: int = Field(2, ge=1)
    """First round in which a client trains its local adapter, before its global one (each for
    ``train.steps_per_round`` steps). The code trains it from its second round on (``epoch > 0``), the
    iterative variant (FedDPA-T). ``federation.rounds`` trains it in the last round only, the nearest this
    runtime has to FedDPA-F (local fine-tuning after federated training)."""
    local_phase_global_weight: float = Field(0.5, ge=0, le=1)
    """While the local adapter trains, the frozen global adapter's output is scaled by this and the local
    adapter's by one minus it (the code's ``local_weight=0.5``)."""
    instances: int = Field(5, ge=1)
    """Training rows a test example's representation is compared with (the code's ``instance_num=5``)."""
    max_weight: float = Field(0.5, gt=0, le=1)
    """An example's local-adapter weight is this times its mean cosine similarity to those rows; the global
    adapter's is one minus it (the code's default, ``half=True``: 0.5)."""
    representation: Literal["last", "mean"] = "last"
    """What represents an input: the final hidden state at its last token (the code's ``emb_type="last"``) or
    the mean over its tokens (``"avg"``), computed with the local adapter alone, as the code does."""


class FedDPAConfig(AlgorithmSettings):
    """Always attention LoRA, twice: a global adapter (sent and averaged) and a local one (kept by the client),
    of the same rank, alpha and targets (the code: r=8, alpha=16, dropout 0.05 on ``q_proj``, ``v_proj``)."""

    name: Literal["feddpa"] = "feddpa"
    builder: ClassVar[str] = "fedexperts.algorithms.feddpa.algorithm:FedDPA"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Applied to the averaged global adapter (the paper: plain FedAvg)."""
    feddpa: FedDPAOptions = Field(default_factory=FedDPAOptions)

"""Settings of FedMoE and randomMoE (arXiv 2408.11304): memory budgets, profiling and expert recommendation."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import ExpertWeightingSettings, FederatedSettings, Section


class FedMoEOptions(Section):
    budget_fraction: float = Field(0.6, gt=0, le=1)
    """Every client's memory budget as a fraction of the full model's bytes (below 1, no client can profile)."""
    budgets: list[Annotated[int, Field(gt=0)]] | None = None
    """Per-client memory budgets in bytes, in client order (one per client); replaces the two keys around it."""
    full_budget_every: int = Field(2, ge=0)
    """Without ``budgets``: clients 0, n, 2n, ... can hold the full model (they measure expert activation for
    everyone; the others get ``budget_fraction``). 0: every client gets ``budget_fraction``."""
    warmup_rounds: int = Field(5, ge=0)
    """Stage 1: rounds of LoRA training on the full MoE a profiling client does before its measuring round (the
    paper: about 5, so ``p`` reflects the task rather than the pretrained router)."""
    wait_for_stage_1: bool = True
    """The paper's order: a budget client sampled before stage 1 has finished (every client whose budget holds the
    full model has measured ``p``) sits the round out, then starts from its category's estimate. ``False``: it
    trains a provisional sub-MoE from the best ``p`` the server has (the federation's, else a uniform prior),
    re-chosen when a better estimate arrives (the paper does not say what such a client does)."""
    budget_counts: Literal["weights", "training"] = "weights"
    """What a memory budget holds. ``weights``: the sub-MoE's weights, frozen ones in the checkpoint's dtype and
    trained ones (held experts' rows, the shared scope) as float32 masters. ``training``: also a float32 gradient
    and AdamW's two float32 moments per trained parameter (the paper's M is a device's memory)."""
    patience: int = Field(2, ge=1)
    """Evaluations without improvement before a client is recommended a new structure."""
    top_k_neighbours: int = Field(2, ge=1)
    """Most similar clients a recommendation draws on."""
    measure_examples: int = Field(64, ge=1)
    """Training rows a profiling client measures expert activation on."""


class RandomMoEOptions(FedMoEOptions):
    seed: int = 0
    """Offset of the random sub-MoEs' seed: each client's draw is seeded by ``(federation.seed, seed, client)``,
    so every federation seed draws its own sub-MoEs."""


class FedMoEConfig(ExpertWeightingSettings, FederatedSettings):
    name: Literal["fedmoe"] = "fedmoe"
    builder: ClassVar[str] = "fedexperts.algorithms.fedmoe.algorithm:FedMoE"
    decides_on_validation: ClassVar[bool] = True
    privacy_unsupported: ClassVar[str | None] = (
        "each expert is averaged among its holders only, and the profiling vectors, held experts and validation "
        "scores it sends are outside any clip (docs/privacy.md)"
    )
    fedmoe: FedMoEOptions = Field(default_factory=FedMoEOptions)

    def check_clients(self, clients: int) -> None:
        budgets = self.fedmoe.budgets
        if budgets is not None and len(budgets) != clients:
            raise ValueError(
                f"algorithm.fedmoe.budgets has {len(budgets)} entries but federation.clients is "
                f"{clients}: give one memory budget (bytes) per client"
            )


class RandomMoEConfig(FedMoEConfig):
    """FedMoE's baseline: random sub-MoEs of the sizes FedMoE's search would choose, no recommendation."""

    name: Literal["random-moe"] = "random-moe"  # type: ignore[assignment]
    builder: ClassVar[str] = "fedexperts.algorithms.fedmoe.random_moe:RandomMoE"
    fedmoe: RandomMoEOptions = Field(default_factory=RandomMoEOptions)

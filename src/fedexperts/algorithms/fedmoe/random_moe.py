"""randomMoE, FedMoE's baseline: the same stages and sizes, random experts, no recommendation."""

from __future__ import annotations

from collections.abc import Sequence

from fedexperts.algorithms.fedmoe.algorithm import FedMoE
from fedexperts.algorithms.fedmoe.config import FedMoEOptions, RandomMoEConfig, RandomMoEOptions


class RandomMoE(FedMoE):
    """randomMoE: random sub-MoEs of exactly the sizes FedMoE's search chooses; no recommendation.

    ``patience`` and ``top_k_neighbours`` are accepted and unused.
    """

    name = "random-moe"

    def __init__(
        self, config: RandomMoEConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        super().__init__(config or RandomMoEConfig(), client_ids=client_ids, seed=seed)

    def _random_seed(self, options: FedMoEOptions, seed: int) -> tuple[int, ...] | None:
        """The random sub-MoEs' seed: ``(federation.seed, algorithm.fedmoe.seed)``, drawn per client."""
        return (seed, options.seed if isinstance(options, RandomMoEOptions) else 0)

    @property
    def seed(self) -> tuple[int, ...]:
        seed = self.schedule.seed
        assert seed is not None
        return seed

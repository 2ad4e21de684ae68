"""Privacy spent, by Flower's own RDP accountant (``flwr.serverapp.RdpAccountant``, over Google's dp-accounting).

What each round releases, as the accountant is told it (docs/privacy.md):

* ``central``: the sum of the sampled clients' clipped updates plus ``N(0, (z * clip)^2)``, then divided by
  the number sampled. The server draws a uniformly random fixed-size subset without replacement each round
  (``federation.fraction``, ``sampling = "random"``), which the accountant models exactly: *sampling without
  replacement* under the *replace-one* neighbouring relation (Wang, Balle and Kasiviswanathan 2019). Replacing
  one client's data moves the clipped sum by up to ``2 * clip``, so the accountant's noise multiplier (noise
  std over the sensitivity) is ``z / 2``. The amplification assumes the sample is secret from the adversary.
* ``local``: each reply is its client's own Gaussian release, seen by the server, which knows who took part:
  no amplification, one release per round (a client takes part at most once a round: an upper bound for every
  client), replace-one sensitivity ``2 * clip`` again, so multiplier ``z / 2``. Flower labels no-amplification
  accounting add-or-remove-one; a Gaussian's RDP depends only on std over sensitivity, so the number is the same.
"""

from __future__ import annotations

from typing import Any

from fedexperts.errors import FedExpertsError


def _flower() -> Any:
    try:
        from flwr import serverapp
    except ImportError as error:  # pragma: no cover - flwr is a dependency of the privacy extra
        raise FedExpertsError(
            'privacy.clip needs Flower\'s privacy accountant: pip install "fedexperts[privacy]"'
        ) from error
    return serverapp


class Accountant:
    """The privacy spent by one run's releases; its state is JSON (checkpointed, replayed bit-exactly on resume)."""

    def __init__(self, *, mode: str, noise_multiplier: float, population: int, sample_size: int, delta: float):
        flower = _flower()
        if mode == "central":
            method, relation = flower.SamplingMethod.WITHOUT_REPLACEMENT, flower.NeighboringRelation.REPLACE_ONE
        else:
            method, relation = flower.SamplingMethod.NO_AMPLIFICATION, flower.NeighboringRelation.ADD_OR_REMOVE_ONE
        self.event = flower.GaussianPrivacyEvent(
            noise_multiplier=noise_multiplier / 2, sample_size=sample_size, population_size=population
        )
        try:
            config = flower.PrivacyConfig(
                target_delta=delta, population_size=population, neighboring_relation=relation, sampling_method=method
            )
            self._accountant = flower.RdpAccountant(config)
        except ImportError as error:
            raise FedExpertsError(
                f'privacy.clip needs dp-accounting for Flower\'s RDP accountant: pip install "fedexperts[privacy]" '
                f"({error})"
            ) from error
        self.delta = delta

    def release(self) -> None:
        """One round's private release happened."""
        self._accountant.compose(self.event)

    @property
    def releases(self) -> int:
        return int(self._accountant.num_releases)

    @property
    def epsilon(self) -> float:
        return float(self._accountant.get_epsilon(self.delta)) if self.releases else 0.0

    def state(self) -> dict[str, Any]:
        return dict(self._accountant.state_dict())

    def load(self, state: dict[str, Any]) -> None:
        try:
            self._accountant.load_state_dict(state)
        except ValueError as error:
            raise FedExpertsError(f"the checkpoint's privacy accountant does not fit privacy.* now: {error}") from None

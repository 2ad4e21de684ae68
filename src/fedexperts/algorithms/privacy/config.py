"""Settings of client-level differential privacy (``privacy.*``), torch-free like every config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedexperts.algorithms.settings import AlgorithmSettings, Section


class PrivacySettings(Section):
    """DP-FedAvg's clip-and-noise around any algorithm's shared update (docs/privacy.md); off unless ``clip`` is set."""

    clip: float | None = Field(None, gt=0)
    """L2 bound on each client's update (its reply minus the global state it started from, over every tensor
    the server aggregates); ``None``: no differential privacy."""
    noise_multiplier: float = Field(1.0, gt=0)
    """Gaussian noise std in units of ``clip``: ``noise_multiplier * clip / sampled clients`` on the aggregate
    (central) or ``noise_multiplier * clip`` on each reply (local)."""
    mode: Literal["central", "local"] = "central"
    """``central``: the server clips each update and noises the aggregate (a trusted server); ``local``: each
    client clips and noises its own update before sending it."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta at which epsilon is reported."""
    seed: int | None = None
    """Seeds the noise (reproducible, and not private against anyone who knows it: tests and studies only).
    ``None``: central noise draws a secret seed at the run's start, kept in the server's checkpoints (a resume
    continues the same noise); local noise comes from the client's OS random source."""

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    def check_fits(self, algorithm: AlgorithmSettings, sampling: str) -> None:
        """Refuse (``ValueError``) what the mechanism or its accounting cannot cover (docs/privacy.md)."""
        reason = type(algorithm).privacy_unsupported
        if reason is not None:
            raise ValueError(f"privacy.clip cannot wrap algorithm {algorithm.name!r}: {reason}")
        if str(getattr(algorithm, "expert_weighting", "examples")) == "tokens":
            raise ValueError(
                "privacy.clip needs algorithm.expert_weighting 'examples': token counts would weigh clients past the "
                "clip (and DP-FedAvg's mean is unweighted)"
            )
        if sampling != "random":
            raise ValueError(
                f"privacy.clip needs federation.sampling 'random', not {sampling!r}: the accountant assumes a "
                "uniformly random sample of the clients"
            )

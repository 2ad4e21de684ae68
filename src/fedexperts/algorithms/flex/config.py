"""Settings of FLEx (arXiv 2506.00965): the shared scope plus the grafting options."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from fedexperts.algorithms.settings import FederatedSettings, Section, SharedScope


class FlexOptions(Section):
    top_n: int = Field(1, ge=1)
    """Experts grafted into each layer's personal slots (the paper: 1)."""
    refresh_every: int = Field(0, ge=0)
    """Re-select the grafted experts every this many rounds (0: choose once, as the paper)."""
    share_gate: bool = False
    """Also aggregate the personal gates (the paper keeps them personal)."""
    calibration_batches: int = Field(4, ge=1)
    """Training batches (of 8 rows) a client scores the experts on."""


class FlexConfig(FederatedSettings):
    name: Literal["flex"] = "flex"
    builder: ClassVar[str] = "fedexperts.algorithms.flex.algorithm:FLEx"
    flex: FlexOptions = Field(default_factory=FlexOptions)

    @field_validator("scope")
    @classmethod
    def _experts_stay_frozen(cls, scope: SharedScope) -> SharedScope:
        if scope is SharedScope.EVERYTHING:
            raise ValueError("'everything' would share the frozen pretrained experts; FLEx keeps them frozen")
        return scope

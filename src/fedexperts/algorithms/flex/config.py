"""Settings of FLEx (arXiv 2506.00965): the shared scope plus the grafting options."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fedexperts.algorithms.settings import FederatedSettings, Section, SharedScope


class PersonalLoraConfig(Section):
    """LoRA on the personal experts and gates (``flex.personal_training="lora"``). The official FLEx code
    uses its one peft config for attention and the grafts: r=32, alpha=64, dropout 0.05 in its scripts."""

    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class FlexOptions(Section):
    top_n: int = Field(1, ge=1)
    """Experts grafted into each layer's personal slots (the paper: 1)."""
    refresh_every: int = Field(0, ge=0)
    """Re-select the grafted experts every this many rounds (0: choose once, as the paper)."""
    share_gate: bool = False
    """Also aggregate the personal gates (the paper keeps them personal)."""
    calibration_batches: int = Field(4, ge=1)
    """Training batches (of 8 rows) a client scores the experts on (used when ``calibration_tokens`` is
    unset). FLEx's code scores offline with Lu et al.'s tool, whose default is 128 sequences of up to
    2048 tokens in batches of 8 (16 batches)."""
    calibration_tokens: int | None = Field(None, ge=1)
    """Score on the client's first training batches until this many real (attention-mask) tokens are
    seen; the batch that reaches it is used whole, and a client with fewer uses all it has. ``None``:
    ``calibration_batches`` batches. Lu et al.'s default is 128 x 2048 = 262144 tokens."""
    gate_bias: bool = True
    """The personal gate has a bias, started at the router's bias for the grafted expert (zero for
    routers without one). The official gate is a bias-free linear (``false``)."""
    personal_training: Literal["full", "lora"] = "full"
    """How the personal experts and gates train: ``full`` (every weight of the grafted copy and gate) or
    ``lora`` (the official code's way: the grafted copy and gate stay frozen at their pretrained values
    and LoRA adapters on their projections train; the personal state holds only the adapters)."""
    personal_lora: PersonalLoraConfig = Field(default_factory=PersonalLoraConfig)
    """Used when ``personal_training`` is ``lora``."""
    criterion: Literal["pooled", "per-batch"] = "per-batch"
    """How the calibration batches' reconstruction errors combine (:mod:`fedexperts.moe.selection`):
    ``per-batch`` sums one Frobenius norm per batch in float64, Lu et al.'s expert-pruning criterion that
    FLEx's code runs (the paper's choice); ``pooled`` is one Frobenius norm over all calibration tokens
    (fedexperts' choice before this option existed)."""

    @model_validator(mode="after")
    def _one_calibration_size(self) -> FlexOptions:
        # Compared with the defaults, not model_fields_set: a flat Flower run config carries every key.
        default_batches = type(self).model_fields["calibration_batches"].default
        if self.calibration_tokens is not None and self.calibration_batches != default_batches:
            raise ValueError("set flex.calibration_batches or flex.calibration_tokens, not both")
        if self.personal_lora != PersonalLoraConfig() and self.personal_training != "lora":
            raise ValueError("flex.personal_lora applies with flex.personal_training=lora only")
        return self


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

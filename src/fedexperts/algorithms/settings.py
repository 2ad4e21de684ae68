"""The pieces every algorithm's config is made of (torch-free, so a config error is reported before torch loads).

Each algorithm declares its own pydantic model (a subclass of :class:`AlgorithmSettings`) in the
``config`` module beside its code, names the callable that builds it, and is listed once in
:mod:`fedexperts.algorithms.registry`; ``ExperimentConfig.algorithm`` is the union of those models,
discriminated by ``name``.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo


class SharedScope(StrEnum):
    """Which parameters the federation trains and shares."""

    ATTENTION_LORA = "attention-lora"
    ATTENTION = "attention"
    NON_EXPERT = "non-expert"
    """Every weight except the routed experts (attention, embeddings, norms, routers, shared experts)."""
    EVERYTHING = "everything"
    """MoE-as-dense: every weight including all routed experts."""


class ServerRule(StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAGRAD = "fedadagrad"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen; a field's docstring is its description
    (``fedexperts config show`` prints it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, use_attribute_docstrings=True)


class LoraConfig(Section):
    rank: int = Field(8, ge=1)
    """LoRA rank r of each adapted projection."""
    alpha: int = Field(16, ge=1)
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input while training."""
    targets: list[str] | None = Field(None, min_length=1)
    """Attention projections that get LoRA, by the module's last name segment (``q_proj``; T5-style
    models name them ``q``, ``k``, ``v``, ``o``). ``None``: every ``nn.Linear`` inside attention (q, k,
    v and o for most families). FLEx's official training scripts use ``["q_proj", "k_proj", "v_proj"]``
    (its code's default, like ours, also includes ``o_proj``). A target no attention module has is an
    error."""


class ServerConfig(Section):
    """The server rule applied to the averaged client result (Reddi et al., 2021)."""

    rule: ServerRule = ServerRule.FEDAVG
    """How the server applies the averaged update: plain averaging, or a server optimizer (Reddi et al.)."""
    lr: float = Field(1.0, gt=0)
    """Server learning rate (``fedavg``: 1 takes the average as it is)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """``fedavgm``: server momentum."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """``fedadagrad``, ``fedadam``, ``fedyogi``: first-moment decay."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """``fedadam``, ``fedyogi``: second-moment decay."""
    tau: float = Field(1e-3, gt=0)
    """Adaptive rules: added to ``sqrt(v)`` in the step; the second moment ``v`` starts at ``tau**2``."""


class AlgorithmSettings(Section):
    """Base of every algorithm's config: its ``name`` (the discriminator) and where its constructor lives."""

    name: str
    builder: ClassVar[str]
    """``"module:callable"``: ``(config, client_ids=..., seed=...)`` -> the algorithm (imported on use)."""
    decides_on_validation: ClassVar[bool] = False
    """The algorithm's server reads clients' validation scores to decide (FedMoE's recommendation): the run
    holds out a validation split of each client's training rows (``data.validation_fraction``)."""

    def check_clients(self, clients: int) -> None:
        """Refuse (``ValueError``) settings that do not fit a federation of ``clients`` clients."""


class ScopedSettings(AlgorithmSettings):
    """An algorithm that trains a chosen scope of parameters (attention LoRA by default)."""

    scope: SharedScope = SharedScope.ATTENTION_LORA
    """What trains: ``attention-lora`` (LoRA on attention), ``attention`` (attention weights), ``non-expert``
    (every weight but the routed experts) or ``everything`` (MoE as dense)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Used when ``scope`` is ``attention-lora``."""

    @model_validator(mode="after")
    def _lora_needs_lora_scope(self) -> ScopedSettings:
        # Compared with the defaults, not model_fields_set: a config that went through a flat Flower
        # run config carries every key, set or not.
        if self.lora != LoraConfig() and self.scope is not SharedScope.ATTENTION_LORA:
            raise ValueError(f"algorithm.lora applies to scope attention-lora only, not {self.scope.value!r}")
        return self

    @property
    def lora_or_none(self) -> LoraConfig | None:
        """The LoRA settings when the scope is attention LoRA, else ``None``."""
        return self.lora if self.scope is SharedScope.ATTENTION_LORA else None


class FederatedSettings(ScopedSettings):
    """A scoped algorithm whose server aggregates with a server rule."""

    server: ServerConfig = Field(default_factory=ServerConfig)


def dotted_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf field of a config model under its dotted key (``flex.top_n``); sections are walked into."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from dotted_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [key for key, _ in dotted_fields(model, prefix)]


def list_item_type(info: FieldInfo) -> Any:
    """The item type of a list-valued field, optional or not (``int`` for ``list[int] | None``); else ``None``."""
    annotation: Any = info.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    for option in options:
        if option is list:
            return Any
        if get_origin(option) is list:
            args = get_args(option)
            item = args[0] if args else Any
            return get_args(item)[0] if get_origin(item) is Annotated else item
    return None


def is_list_field(info: FieldInfo) -> bool:
    """A list-valued field, optional or not (``list[int] | None``)."""
    return list_item_type(info) is not None

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


class ServerVariant(StrEnum):
    """Whose reading of the adaptive server rules (:mod:`fedexperts.algorithms.aggregation` gives both in full)."""

    PAPER = "paper"
    """Reddi et al.'s Algorithm 2: the second moment starts at ``tau**2``, no bias correction, FedAdagrad keeps
    a first moment."""
    FLOWER = "flower"
    """``flwr.serverapp.strategy``: the second moment starts at 0, FedAdam bias-corrects its step, FedAdagrad
    has no first moment."""


DEFAULT_SERVER_LR: dict[ServerRule, float] = {
    ServerRule.FEDAVG: 1.0,
    ServerRule.FEDAVGM: 1.0,
    ServerRule.FEDADAGRAD: 0.1,
    ServerRule.FEDADAM: 0.1,
    ServerRule.FEDYOGI: 0.01,
}
"""``algorithm.server.lr`` when unset: 1 takes FedAvg's average as it is (and is Flower's FedAvgM default);
the adaptive rules take Flower's defaults (``eta`` of its FedAdagrad, FedAdam, FedYogi). Their first step moves
each weight by about ``lr`` wherever the clients' mean change is well above ``tau``, whatever its size, so 1
would move such weights by about 1."""


class ExpertWeighting(StrEnum):
    """How the server weighs clients when it averages a routed expert's tensors."""

    EXAMPLES = "examples"
    TOKENS = "tokens"


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
    """The server rule applied to the averaged client result (Reddi et al., 2021; Hsu et al., 2019)."""

    rule: ServerRule = ServerRule.FEDAVG
    """How the server applies the averaged update: plain averaging, or a server optimizer (Reddi et al.)."""
    variant: ServerVariant = ServerVariant.PAPER
    """The adaptive rules as written in Reddi et al.'s Algorithm 2 (``paper``: second moment started at
    ``tau**2``, no bias correction, FedAdagrad with a first moment) or as Flower's strategies compute them
    (``flower``: second moment started at 0, FedAdam's step bias-corrected, FedAdagrad without a first moment,
    so ``beta1`` is unused there). ``fedavg`` and ``fedavgm`` are the same under both."""
    lr: float | None = Field(None, gt=0)
    """Server learning rate. Unset: the rule's default, 1 for ``fedavg`` (the average as it is) and ``fedavgm``,
    0.1 for ``fedadagrad`` and ``fedadam``, 0.01 for ``fedyogi`` (Flower's defaults: an adaptive rule's first
    step moves a weight by about ``lr`` wherever the clients' mean change is well above ``tau``)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """``fedavgm``: server momentum (Flower's FedAvgM defaults to 0, which is plain FedAvg)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """``fedadagrad`` (``paper`` variant only), ``fedadam``, ``fedyogi``: first-moment decay."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """``fedadam``, ``fedyogi``: second-moment decay."""
    tau: float = Field(1e-3, gt=0)
    """Adaptive rules: added to ``sqrt(v)`` in the step (and, ``paper`` variant, the second moment ``v`` starts
    at ``tau**2``)."""

    @property
    def learning_rate(self) -> float:
        """``lr``, or the rule's default (:data:`DEFAULT_SERVER_LR`) when it is unset."""
        return DEFAULT_SERVER_LR[self.rule] if self.lr is None else self.lr


class AlgorithmSettings(Section):
    """Base of every algorithm's config: its ``name`` (the discriminator) and where its constructor lives."""

    name: str
    builder: ClassVar[str]
    """``"module:callable"``: ``(config, client_ids=..., seed=...)`` -> the algorithm (imported on use)."""
    decides_on_validation: ClassVar[bool] = False
    """The algorithm's server reads clients' validation scores to decide (FedMoE's recommendation): the run
    holds out a validation split of each client's training rows (``data.validation_fraction``)."""

    privacy_unsupported: ClassVar[str | None] = None
    """Why client-level differential privacy (``privacy.clip``) cannot wrap this algorithm; ``None``: it can."""

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


class ExpertWeightingSettings(Section):
    """Mixed into the configs of algorithms that can share routed experts or router rows."""

    expert_weighting: ExpertWeighting = ExpertWeighting.EXAMPLES
    """How each shared routed expert (its rows of the fused expert tensors and of the router) is averaged:
    ``examples`` weighs every client by its training examples, as every other tensor; ``tokens`` weighs each
    expert by the real tokens each client routed to it during its local training (activation-aware, after
    FLAME and FedAlign-MoE), so an expert a client hardly used is not pulled back towards its copy, and an
    expert no client routed to keeps its global value."""

    def unshared_experts(self) -> str | None:
        """Why these settings share no routed expert or router row, which ``tokens`` weighs (``None``: they do)."""
        return None

    @model_validator(mode="after")
    def _tokens_need_shared_experts(self) -> ExpertWeightingSettings:
        reason = self.unshared_experts() if self.expert_weighting is ExpertWeighting.TOKENS else None
        if reason is not None:
            raise ValueError(f"algorithm.expert_weighting 'tokens' weighs shared routed experts and routers: {reason}")
        return self


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

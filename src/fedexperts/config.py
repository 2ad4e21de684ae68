"""Experiment configuration: a TOML file validated by pydantic, with dotted ``key=value`` overrides.

Unknown keys, wrong types and out-of-range values are reported as one :class:`ConfigError` per
problem, naming the dotted key and what is allowed, so the CLI can print them without a traceback.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from fedexperts.algorithms.aggregation import ServerRule
from fedexperts.algorithms.base import SharedScope
from fedexperts.errors import FedExpertsError


class ConfigError(FedExpertsError):
    """An experiment config that does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class ModelConfig(_Section):
    name: str = "builtin"
    """``builtin`` (the pretrained ExpertBench MoE), a local folder, or a hub name."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None
    trust_remote_code: bool = False


class DataConfig(_Section):
    source: str = "expertbench"
    """``expertbench``, a local JSON/JSONL/CSV/Parquet file or folder, or a hub dataset name."""
    columns: str | None = None
    items: int = Field(1200, ge=1)
    """ExpertBench: how many tasks to generate."""
    scheme: Literal["iid", "dirichlet", "pathological"] = "pathological"
    alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(1, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_length: int = Field(256, ge=8)
    skip_bad_rows: bool = False
    seed: int = 0
    """Seed of the data and its partition (kept apart from ``federation.seed`` so seeds share one split)."""


class AlgorithmName(StrEnum):
    LOCAL = "local"
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    DENSE = "dense"
    FLEX = "flex"
    RANDOM_EXPERT = "random-expert"
    """FLEx's own baseline: FedAvg of attention LoRA plus one randomly chosen routed expert per layer."""
    FEDMOE = "fedmoe"
    RANDOM_MOE = "random-moe"
    """FedMoE's baseline: random sub-MoEs of the sizes FedMoE's search would choose."""


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class ServerConfig(_Section):
    rule: ServerRule = ServerRule.FEDAVG
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FlexConfig(_Section):
    top_n: int = Field(1, ge=1)
    """Experts grafted into each layer's personal slots (the paper: 1)."""
    refresh_every: int = Field(0, ge=0)
    """Re-select the grafted experts every this many rounds (0: choose once, as the paper)."""
    share_gate: bool = False
    """Also aggregate the personal gates (the paper keeps them personal)."""
    calibration_batches: int = Field(4, ge=1)
    """Training batches (of 8 rows) a client scores the experts on."""


class FedMoEConfig(_Section):
    """FedMoE and randomMoE (arXiv 2408.11304): memory budgets, profiling and expert recommendation."""

    budget_fraction: float = Field(0.6, gt=0, le=1)
    """Every client's memory budget as a fraction of the full model's bytes (below 1, no client can profile)."""
    budgets: list[Annotated[int, Field(gt=0)]] | None = None
    """Per-client memory budgets in bytes, in client order (one per client); replaces the two keys around it."""
    full_budget_every: int = Field(2, ge=0)
    """Without ``budgets``: clients 0, n, 2n, ... can hold the full model (they measure expert activation for
    everyone; the others get ``budget_fraction``). 0: every client gets ``budget_fraction``."""
    warmup_rounds: int = Field(0, ge=0)
    """Rounds of LoRA training on the full MoE a profiling client does before it measures expert activation."""
    patience: int = Field(2, ge=1)
    """Evaluations without improvement before a client is recommended a new structure."""
    top_k_neighbours: int = Field(2, ge=1)
    """Most similar clients a recommendation draws on."""
    measure_examples: int = Field(64, ge=1)
    """Training rows a profiling client measures expert activation on."""
    seed: int = 0
    """random-moe: seed of the random sub-MoEs."""


class AlgorithmConfig(_Section):
    name: AlgorithmName = AlgorithmName.FLEX
    scope: SharedScope = SharedScope.ATTENTION_LORA
    mu: float = Field(0.01, ge=0)
    """FedProx's proximal weight."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    flex: FlexConfig = Field(default_factory=FlexConfig)
    fedmoe: FedMoEConfig = Field(default_factory=FedMoEConfig)


class FederationConfig(_Section):
    clients: int = Field(5, ge=1)
    rounds: int = Field(3, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    sampling: Literal["random", "distinct"] = "random"
    """``distinct``: each round's clients hold different majority categories where possible (FedMoE's study)."""
    min_clients: int = Field(1, ge=1)
    """Clients sampled per round at least (when ``fraction`` would pick fewer)."""
    min_successful: int = Field(1, ge=1)
    """A round with fewer successful clients than this fails the run."""
    seed: int = 0
    transfer_dtype: Literal["float16", "bfloat16"] | None = None
    """Cast floating tensors to this dtype on the wire, both ways (half the bytes of float32); each receiver
    restores the tensors' own dtype. Flower carries float16 only (numpy has no bfloat16)."""
    reply_timeout: float = Field(600.0, gt=0)
    """Flower: seconds the server waits for a round's replies; a client that has not replied by then failed."""
    node_wait: float = Field(300.0, gt=0)
    """Flower: seconds the server waits, before round 1, for every client's SuperNode to connect."""


class TrainConfig(_Section):
    learning_rate: float = Field(5e-3, gt=0)
    min_learning_rate: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    steps_per_round: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    router_aux_loss_coef: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    bf16: bool = False


class EvalConfig(_Section):
    every: int = Field(1, ge=0)
    """Evaluate sampled clients (before they train) every this many rounds; 0: only the final evaluation."""
    max_new_tokens: int = Field(32, ge=1)
    max_examples: int | None = Field(32, ge=1)
    """Per client test split, to bound evaluation time (``None``: all); the same subset every round."""
    union_examples: int = Field(64, ge=0)
    """Final evaluation of each client on this many examples pooled from every client's test split (0: skip)."""
    probes: int = Field(64, ge=0)
    """Knowledge probes per client in the final evaluation (ExpertBench only; 0: skip)."""
    batch_size: int = Field(16, ge=1)


class ExperimentConfig(_Section):
    name: str = "default"
    output_dir: Path = Path("runs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.federation.min_clients > self.federation.clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds federation.clients "
                f"({self.federation.clients})"
            )
        if self.federation.min_successful > self.federation.min_clients:
            raise ValueError(
                f"federation.min_successful ({self.federation.min_successful}) exceeds federation.min_clients "
                f"({self.federation.min_clients}): a round could never succeed"
            )
        budgets = self.algorithm.fedmoe.budgets
        if budgets is not None and len(budgets) != self.federation.clients:
            raise ValueError(
                f"algorithm.fedmoe.budgets has {len(budgets)} entries but federation.clients is "
                f"{self.federation.clients}: give one memory budget (bytes) per client"
            )
        return self


def _describe(error: ErrorDetails) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    context = error.get("ctx") or {}
    allowed = context.get("expected")
    suffix = f" (allowed: {allowed})" if allowed else ""
    return f"{key}: {error['msg']}{suffix}"


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_allowed_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as TOML, else taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a config mapping after applying dotted overrides."""
    merged: dict[str, Any] = {key: value for key, value in data.items()}
    for override in overrides or []:
        path, value = parse_override(override)
        allowed = _allowed_keys(ExperimentConfig)
        if ".".join(path) not in allowed:
            raise ConfigError(f"override {'.'.join(path)!r}: unknown key; keys are: {', '.join(allowed)}")
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as error:
        problems = "; ".join(_describe(item) for item in error.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file (none: the built-in default) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        try:
            data = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{source}: not valid TOML ({error})") from None
    return build_config(data, overrides)

"""Experiment configuration: a TOML file validated by pydantic, with dotted ``key=value`` overrides.

Unknown keys, wrong types and out-of-range values are reported as one :class:`ConfigError` per
problem, naming the dotted key and what is allowed, so the CLI can print them without a traceback.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.registry import (
    CONFIGS,
    DEFAULT_ALGORITHM,
    AlgorithmConfig,
    algorithm_names,
    owners,
)
from fedexperts.algorithms.settings import Section, dotted_fields, dotted_keys, is_list_field, list_item_type
from fedexperts.errors import FedExpertsError


class ConfigError(FedExpertsError):
    """An experiment config that does not validate."""


class ModelConfig(Section):
    name: str = "builtin"
    """``builtin`` (the pretrained ExpertBench MoE; ``builtin:experts32`` its 32-expert variant), a local folder,
    or a hub name."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None
    trust_remote_code: bool = False


DEFAULT_VALIDATION_FRACTION = 0.1
"""``data.validation_fraction`` for algorithms that decide on validation scores, when not given."""


class DataConfig(Section):
    source: str = "expertbench"
    """``expertbench``, a local JSON/JSONL/CSV/Parquet file or folder, or a hub dataset name."""
    columns: str | None = None
    items: int = Field(1200, ge=1)
    """ExpertBench: how many tasks to generate."""
    scheme: Literal["iid", "dirichlet", "pathological"] = "pathological"
    alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(1, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    categories: list[str] | None = Field(None, min_length=1)
    """Keep only rows of these categories, before partitioning (``None``: all). A category no row has is an error.
    FLEx's Dolly splits: ``["closed_qa", "information_extraction", "classification", "summarization"]``."""
    rows_per_client: int | None = Field(None, ge=1)
    """Draw this many training rows per client, with replacement (FLEx's Dirichlet split: 1000). ``None``: the
    rows are split among the clients, none repeated."""
    test_per_category: int | None = Field(None, ge=1)
    """Hold out this many rows of each category as the test set before the split (FLEx: 100); each client is
    tested on the held-out rows of its categories. ``None``: ``test_fraction`` of each client's own rows."""
    validation_fraction: float | None = Field(None, ge=0, lt=1)
    """Share of each client's training rows held out as its validation split (at least one row when above 0),
    scored before training every round; selection, recommendation and early-stopping decisions read it, never
    the test rows. ``None``: 0.1 for algorithms that decide on validation scores (FedMoE, randomMoE, so both
    train on the same rows), else 0 (no split)."""
    max_length: int = Field(256, ge=8)
    skip_bad_rows: bool = False
    seed: int = 0
    """Seed of the data and its partition (kept apart from ``federation.seed`` so seeds share one split)."""


class FederationConfig(Section):
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
    client_model: Literal["shared", "sub-moe"] = "shared"
    """Where a client step's model comes from. ``shared``: one base model per process, which FedMoE clients
    train views of (a fast simulation; the process holds the full model). ``sub-moe``: each client of an
    algorithm that names its experts (``fedmoe``, ``random-moe``) loads only its sub-MoE from the checkpoint,
    a profiling client the full model (what a device does; ``model.name`` must be ``builtin`` or a local
    folder). Other algorithms always share the base. Flower nodes always load sub-MoEs for such algorithms."""
    transfer_dtype: Literal["float16", "bfloat16"] | None = None
    """Cast floating tensors to this dtype on the wire, both ways (half the bytes of float32); each receiver
    restores the tensors' own dtype. Flower carries float16 only (numpy has no bfloat16)."""
    reply_timeout: float = Field(600.0, gt=0)
    """Flower: seconds the server waits for a round's replies; a client that has not replied by then failed."""
    node_wait: float = Field(300.0, gt=0)
    """Flower: seconds the server waits, before round 1, for every client's SuperNode to connect."""


class TrainConfig(Section):
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
    router_aux_loss: Literal["auto", "pooled", "per-layer"] = "auto"
    """How the load-balancing loss combines the MoE layers (used when ``router_aux_loss_coef > 0``).
    ``pooled``: transformers' own ``load_balancing_loss_func`` (expert counts and router probabilities
    pooled over every layer's real tokens, top-k counts not divided by k), so a model card's
    ``router_aux_loss_coef`` means the same here; it needs every MoE layer to have the same expert count
    and top-k. ``per-layer``: the mean over layers of each layer's ``E * sum_i f_i P_i`` with ``f`` divided
    by top-k (fedexperts' only form before this option; sub-MoEs whose layers differ need it). ``auto``:
    pooled when the layers agree, else per-layer. The default changed from per-layer to ``auto``; with the
    default coefficient 0 nothing is computed, so default runs are unaffected."""
    gradient_checkpointing: bool = False
    bf16: bool = False


class EvalConfig(Section):
    every: int = Field(1, ge=0)
    """Evaluate sampled clients (before they train) every this many rounds; 0: only the final evaluation."""
    max_new_tokens: int = Field(32, ge=1)
    max_examples: int | None = Field(32, ge=1)
    """Per client test split, to bound evaluation time (``None``: all); the same subset every round."""
    union_examples: int = Field(64, ge=0)
    """Final evaluation of each client on this many examples pooled from every client's test split (0: skip)."""
    probes: int = Field(64, ge=0)
    """Knowledge probes per client in the final evaluation (ExpertBench only; 0: skip)."""
    mmlu: Path | None = None
    """MMLU-format questions (a ``<subject>_test.csv`` file or folder of them, or the hub copy's Parquet/JSONL) scored
    in the final evaluation beside the probes, per subject and overall; see :mod:`fedexperts.data.mmlu`."""
    mmlu_examples: int | None = Field(20, ge=1)
    """Questions per MMLU subject (a seeded subset, the same for every client; ``None`` or a large number: all)."""
    batch_size: int = Field(16, ge=1)
    rouge_stemmer: bool = True
    """Porter-stem words before ROUGE (rouge-score's ``use_stemmer``, as FLEx's evaluation does): ``runs`` matches
    ``running``. Only the ``default`` and ``whitespace`` tokenizers stem."""
    rouge_tokenizer: Literal["default", "characters", "whitespace"] = "default"
    """How ROUGE splits text: ``default`` is rouge-score's (lowercased ``a-z0-9`` runs; any other script has no
    tokens and scores 0); ``characters`` makes every non-space character a token (Chinese, Japanese);
    ``whitespace`` makes every whitespace-separated run a token (other scripts that space their words)."""


class ExperimentConfig(Section):
    name: str = "default"
    """The run's folder under ``output_dir``: a relative path (``study/a`` nests) that stays inside it."""
    output_dir: Path = Path("runs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=FlexConfig)
    """One algorithm's settings, chosen by ``algorithm.name`` (default ``flex``); see its ``config`` module."""
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_algorithm(cls, data: Any) -> Any:
        section = data.get("algorithm") if isinstance(data, dict) else None
        if isinstance(section, dict) and "name" not in section:
            return {**data, "algorithm": {**section, "name": DEFAULT_ALGORITHM}}
        return data

    @field_validator("name")
    @classmethod
    def _inside_output_dir(cls, name: str) -> str:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or Path(name).drive or any(part in ("..", ".") for part in parts):
            raise ValueError(
                f"{name!r} must be a relative folder name inside output_dir (no absolute path, '.' or '..' parts)"
            )
        return name

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
        self.algorithm.check_clients(self.federation.clients)
        if self.data.validation_fraction == 0 and self.algorithm.decides_on_validation:
            raise ValueError(
                f"data.validation_fraction is 0 but algorithm {self.algorithm.name!r} decides on validation "
                "scores: give it a validation split (e.g. 0.1), or leave the key out for the default"
            )
        return self

    @property
    def validation_fraction(self) -> float:
        """``data.validation_fraction`` resolved (its ``None`` default depends on the algorithm)."""
        if self.data.validation_fraction is not None:
            return self.data.validation_fraction
        return DEFAULT_VALIDATION_FRACTION if self.algorithm.decides_on_validation else 0.0


def _describe(error: ErrorDetails) -> str:
    location = [str(part) for part in error["loc"]]
    chosen = None
    if len(location) > 1 and location[0] == "algorithm" and location[1] in algorithm_names():
        chosen = location.pop(1)  # pydantic names the union member; the user's key has no such level
    key = ".".join(location) or "config"
    if error["type"] == "extra_forbidden":
        if chosen is not None and len(location) > 1:
            belongs = owners(".".join(location[1:]))
            if belongs:
                return f"{key}: not a setting of algorithm {chosen!r} (it belongs to {', '.join(belongs)})"
        return f"{key}: unknown key"
    if error["type"] == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag")
        *rest, last = (repr(name) for name in algorithm_names())
        return f"{key}.name: {tag!r} is no algorithm (allowed: {', '.join(rest)} or {last})"
    context = error.get("ctx") or {}
    allowed = context.get("expected")
    suffix = f" (allowed: {allowed})" if allowed else ""
    return f"{key}: {error['msg']}{suffix}"


def list_valued_keys() -> dict[str, Any]:
    """Dotted keys whose values are lists, in any section or algorithm, and their item types (Flower's
    run config flattens them)."""
    keys = {key: list_item_type(info) for key, info in dotted_fields(ExperimentConfig) if is_list_field(info)}
    for config in CONFIGS:
        keys.update(
            {f"algorithm.{key}": list_item_type(info) for key, info in dotted_fields(config) if is_list_field(info)}
        )
    return keys


@cache
def _allowed_keys() -> tuple[str, ...]:
    """Every dotted key an override may set: the sections' keys and every algorithm's (the schemas are fixed)."""
    keys = [key for key in dotted_keys(ExperimentConfig) if key != "algorithm"]
    for config in CONFIGS:
        keys.extend(f"algorithm.{key}" for key in dotted_keys(config) if f"algorithm.{key}" not in keys)
    return tuple(keys)


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
    allowed = _allowed_keys()
    for override in overrides or []:
        path, value = parse_override(override)
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

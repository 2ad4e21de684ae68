"""Experiment configuration: a TOML file validated by pydantic, with dotted ``key=value`` overrides.

Unknown keys, wrong types and out-of-range values are reported as one :class:`ConfigError` per
problem, naming the dotted key and what is allowed, so the CLI can print them without a traceback.

A relative path in a config file (``output_dir``, ``eval.mmlu``, and ``model.name`` or
``data.source`` when they name a local file or folder) is relative to the file's folder, so a
config works from any working directory; a path given as an override on the command line is
relative to the working directory, as shells expect.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.privacy.config import PrivacySettings
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


BUILTIN_MODEL = "builtin"
"""``model.name`` of the built-in pretrained ExpertBench MoE."""
EXPERTBENCH = "expertbench"
"""``data.source`` of the generated ExpertBench tasks."""
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
"""The local data files :mod:`fedexperts.data.sources` reads."""


class ModelConfig(Section):
    name: str = BUILTIN_MODEL
    """``builtin`` (the pretrained ExpertBench MoE; ``builtin:experts32`` its 32-expert variant, ``builtin:switch-8``
    and ``builtin:switch-32`` encoder-decoder Switch Transformers), a local folder, or a hub name."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype of the base model's weights (what trains is kept in float32 over a half-precision base)."""
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None
    """transformers' kernel for fused experts (unset: transformers' choice)."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint; only for code you trust."""

    @field_validator("name")
    @classmethod
    def _builtin_spelling(cls, name: str) -> str:
        """``builtin-switch-8`` (another spelling) is ``builtin:switch-8``, unless such a folder exists."""
        prefix = f"{BUILTIN_MODEL}-"
        if name.startswith(prefix) and len(name) > len(prefix) and not Path(name).expanduser().exists():
            return f"{BUILTIN_MODEL}:{name[len(prefix) :]}"
        return name


DEFAULT_VALIDATION_FRACTION = 0.1
"""``data.validation_fraction`` for algorithms that decide on validation scores, when not given."""


class DataConfig(Section):
    source: str = EXPERTBENCH
    """``expertbench``, a local JSON/JSONL/CSV/Parquet file or folder, or a hub dataset name."""
    columns: str | None = None
    """Which columns hold the fields: a preset (``dolly``, ``alpaca``) or ``instruction=q,response=a`` pairs
    (unset: recognise Dolly or Alpaca)."""
    items: int = Field(1200, ge=1)
    """ExpertBench: how many tasks to generate."""
    scheme: Literal["iid", "dirichlet", "pathological"] = "pathological"
    """How rows are split across clients, by category."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration: small is skewed, large is close to IID."""
    classes_per_client: int = Field(1, ge=1)
    """Pathological: categories per client."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each client's rows held out as its test split."""
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
    """Tokens per example; a longer prompt loses tokens from its left, the response is never cut."""
    skip_bad_rows: bool = False
    """Drop rows with missing or empty fields (and count them) instead of stopping at the first."""
    seed: int = 0
    """Seed of the data and its partition (kept apart from ``federation.seed`` so seeds share one split)."""


def round_size(clients: int, fraction: float, minimum: int) -> int:
    """Clients sampled per round: ``max(minimum, ceil(fraction * clients))``, at most ``clients``.

    The product is rounded to 9 decimals before the ceiling, so a fraction written as a decimal of a count
    (``7 / 25`` times 25 is 7.000000000000001) picks that count, not one more."""
    return min(clients, max(minimum, math.ceil(round(fraction * clients, 9))))


class FederationConfig(Section):
    clients: int = Field(5, ge=1)
    """Number of clients (each gets its own partition of the data)."""
    rounds: int = Field(3, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    """Share of the clients sampled each round."""
    sampling: Literal["random", "distinct"] = "random"
    """``distinct``: each round's clients hold different majority categories where possible (FedMoE's study)."""
    min_clients: int = Field(1, ge=1)
    """Clients sampled per round at least (when ``fraction`` would pick fewer)."""
    min_successful: int = Field(1, ge=1)
    """A round with fewer successful clients than this fails the run."""
    seed: int = 0
    """Seed of sampling, initialisation and training (the data split has ``data.seed``)."""
    client_model: Literal["shared", "sub-moe"] = "shared"
    """Where a client step's model comes from. ``shared``: one base model per process, which FedMoE clients
    train views of (a fast simulation; the process holds the full model). ``sub-moe``: each client of an
    algorithm that names its experts (``fedmoe``, ``random-moe``) loads only its sub-MoE from the checkpoint,
    a profiling client the full model (what a device does; ``model.name`` must be ``builtin`` or a local
    folder). Other algorithms always share the base. Flower nodes always load sub-MoEs for such algorithms."""
    parallel_clients: int = Field(1, ge=1)
    """In-process runtime: train this many of a round's sampled clients at a time as one batch through the shared
    frozen base, each client's rows through its own trainable tensors and optimizer (:mod:`fedexperts.batching`;
    the same results as one after another, within float tolerance). An algorithm or setting that cannot batch
    says why and runs its clients one after another. Flower runs one client per node and ignores it."""
    transfer_dtype: Literal["float16", "bfloat16"] | None = None
    """Cast floating tensors to this dtype on the wire, both ways (half the bytes of float32); each receiver
    restores the tensors' own dtype. Flower carries float16 only (numpy has no bfloat16)."""
    reply_timeout: float = Field(600.0, gt=0)
    """Flower: seconds the server waits for a round's replies; a client that has not replied by then failed."""
    node_wait: float = Field(300.0, gt=0)
    """Flower: seconds the server waits, before round 1, for every client's SuperNode to connect."""
    max_reply_metadata_bytes: int = Field(1 << 20, ge=1024)
    """The most bytes of JSON metadata a client's reply may carry (metrics, reports, routed-token counts)."""
    audit: bool = False
    """Keep every accepted update (with the weight it was given) and each round's new global state under
    ``audit/round-NNNNNN/`` of the run directory, so that anyone can recompute each aggregate from exactly
    the replies that were accepted. Costs one global state per round plus one update per accepted client."""


class TrainConfig(Section):
    learning_rate: float = Field(5e-3, gt=0)
    """Peak AdamW learning rate; a cosine schedule runs over all rounds' steps."""
    min_learning_rate: float = Field(0.0, ge=0)
    """Where the cosine schedule ends."""
    weight_decay: float = Field(0.0, ge=0)
    steps_per_round: int = Field(10, ge=1)
    """Optimizer steps each sampled client takes per round."""
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip gradients to this norm (unset: no clipping)."""
    warmup_steps: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    router_aux_loss_coef: float = Field(0.0, ge=0)
    """Weight of the router load-balancing loss (0: not computed)."""
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
    """Recompute activations in the backward pass: less memory, more time."""
    bf16: bool = False
    """Autocast to bfloat16 while training."""


class EvalConfig(Section):
    every: int = Field(1, ge=0)
    """Evaluate sampled clients (before they train) every this many rounds; 0: only the final evaluation."""
    max_new_tokens: int = Field(32, ge=1)
    """Greedy generation length for the scores."""
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
    """Examples per evaluation batch."""
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
    """Where runs are written."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=FlexConfig)
    """One algorithm's settings, chosen by ``algorithm.name`` (default ``flex``); see its ``config`` module."""
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    """Client-level differential privacy around the algorithm (off unless ``privacy.clip`` is set)."""

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
        if self.privacy.enabled:
            self.privacy.check_fits(self.algorithm, self.federation.sampling)
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
        return f"{key}: unknown key{_suggestion(key, _allowed_keys())}"
    if error["type"] == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag")
        *rest, last = (repr(name) for name in algorithm_names())
        return f"{key}.name: {tag!r} is no algorithm (allowed: {', '.join(rest)} or {last})"
    context = error.get("ctx") or {}
    allowed = context.get("expected")
    suffix = f" (allowed: {allowed})" if allowed and str(allowed) not in error["msg"] else ""
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


def _suggestion(key: str, allowed: tuple[str, ...]) -> str:
    """`` (did you mean ...?)`` for the nearest allowed keys (``train.lr``: ``train.learning_rate``), and where
    every key is listed."""
    section, _, last = key.rpartition(".")
    siblings = {known.rpartition(".")[2]: known for known in allowed if known.rpartition(".")[0] == section}
    initials = [known for name, known in siblings.items() if "".join(part[:1] for part in name.split("_")) == last]
    close = [siblings[name] for name in difflib.get_close_matches(last, list(siblings), n=2, cutoff=0.7)]
    near = list(dict.fromkeys([*initials, *close, *difflib.get_close_matches(key, allowed, n=2, cutoff=0.8)]))
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    return f"{hint}; `fedexperts config show --defaults` lists every key"


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
            raise ConfigError(f"override {'.'.join(path)!r}: unknown key{_suggestion('.'.join(path), allowed)}")
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


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a folder; expected a TOML config file") from None
    except PermissionError:
        raise ConfigError(f"{source}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None


def names_local_path(value: str, folder: Path, suffixes: tuple[str, ...] = ()) -> bool:
    """``value`` (a ``model.name`` or ``data.source``) means a path: it starts like one, ends like a data
    file, or exists under ``folder``; anything else is a keyword or a hub name."""
    if value in (BUILTIN_MODEL, EXPERTBENCH) or value.startswith(f"{BUILTIN_MODEL}:"):
        return False
    return value.startswith(("/", "./", "../", "~")) or value.lower().endswith(suffixes) or (folder / value).exists()


def _relative_to(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its relative paths made relative to ``folder`` (the config file's), absolute."""

    def resolved(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (folder / path).resolve())

    resolved_data = {**data}
    if "output_dir" in data:
        resolved_data["output_dir"] = resolved(data["output_dir"])
    for section, key, suffixes in (
        ("eval", "mmlu", None),
        ("model", "name", ()),
        ("data", "source", LOCAL_DATA_SUFFIXES),
    ):
        table = data.get(section)
        if not isinstance(table, dict) or not isinstance(table.get(key), str):
            continue
        if suffixes is None or names_local_path(table[key], folder, suffixes):
            resolved_data[section] = {**table, key: resolved(table[key])}
    return resolved_data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file (none: the built-in default) and apply overrides.

    Relative paths in the file are taken relative to its folder (see the module docstring).
    """
    data: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        data = _relative_to(source.absolute().parent, _read_toml(source))
    return build_config(data, overrides)


def check_data_source(source: str, key: str = "data.source") -> None:
    """Refuse a ``data.source`` that names a local file or folder (see :func:`load_config`) that is not there."""
    if not names_local_path(source, Path.cwd(), LOCAL_DATA_SUFFIXES):
        return
    data = Path(source).expanduser()
    if not data.exists():
        raise ConfigError(
            f"{key}: no such file or folder: {source} (expected {EXPERTBENCH!r}, a local JSON, JSONL, CSV or Parquet "
            "file or folder, or a hub dataset)"
        )
    if data.is_file() and not data.name.lower().endswith(LOCAL_DATA_SUFFIXES):
        raise ConfigError(f"{key}: {source} is not one of {', '.join(LOCAL_DATA_SUFFIXES)}")


def check_local_paths(config: ExperimentConfig) -> None:
    """Refuse, naming the key, a local path in ``config`` that cannot be what it should (before anything loads).

    For a run on this machine: a Flower deployment's paths need only exist where its clients run.
    """
    model = config.model.name
    if names_local_path(model, Path.cwd()):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            found = "is a file, not" if folder.exists() else "no such folder:"
            raise ConfigError(f"model.name: {found} {model} (expected a model folder: config.json, weights, tokenizer)")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.name: {model} holds no config.json; expected a Hugging Face model folder")
    check_data_source(config.data.source)
    if config.eval.mmlu is not None and not config.eval.mmlu.expanduser().exists():
        raise ConfigError(f"eval.mmlu: no such file or folder: {config.eval.mmlu}")
    if config.output_dir.is_file():
        raise ConfigError(f"output_dir: {config.output_dir} is a file; expected a folder (made if missing)")

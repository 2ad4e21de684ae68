"""From a validated config to what a run needs: the base model, tokenizer, algorithm and client data.

Both runtimes build their setting here, so a client's data, its evaluation subset and the
algorithm's starting point are the same functions of the config whichever runtime runs it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from fedexperts.algorithms.registry import build_algorithm
from fedexperts.config import BUILTIN_MODEL, EXPERTBENCH, ExperimentConfig, round_size
from fedexperts.data.expertbench import ExpertBench, KnowledgeProbe
from fedexperts.data.layout import CAUSAL, BatchLayout, batch_layout
from fedexperts.data.mmlu import MMLUQuestion, load_mmlu
from fedexperts.data.partition import Partition, hold_out_validation, spec_from_config
from fedexperts.data.templates import PromptTemplate, prompt_template
from fedexperts.data.tokenize import OverlongRowError, TokenizedData, tokenize_instructions
from fedexperts.errors import DataError, FedExpertsError
from fedexperts.evaluation import EvalSet
from fedexperts.interface import Algorithm, Payload
from fedexperts.models.load import LoadedModel, load_model
from fedexperts.models.partial import load_meta, load_sub_moe


def client_ids(count: int) -> list[str]:
    """``client-00`` ... : zero-padded so that they sort in client order."""
    width = len(str(max(count - 1, 0)))
    return [f"client-{index:0{width}d}" for index in range(count)]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from ``(seed, round, client, ...)``: stateless, so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class ClientData:
    client_id: str
    index: int
    train: tuple[dict[str, list[int]], ...]
    """Tokenized training rows (``input_ids``, ``labels``)."""
    test: EvalSet
    categories: dict[str, int]
    """Training rows per category (empty when the data has no categories)."""
    validation: EvalSet | None = None
    """Rows held out of the client's training data (``data.validation_fraction``) for decisions; ``None``: none."""

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class ClientModels:
    """Where a client step's model comes from (``federation.client_model``).

    Without a ``folder`` every client works on the shared base model (FedMoE: views of it). With
    one, a client whose algorithm names its experts (:meth:`~fedexperts.interface.Algorithm.client_experts`)
    loads only those from the checkpoint, and the algorithm prepares that model as it did the base.
    """

    folder: Path | None = None
    dtype: str = "float32"
    device: str = "cpu"
    experts_implementation: str | None = None

    def model_for(self, algorithm: Algorithm, shared: nn.Module, received: Payload) -> nn.Module:
        """The shared base, or the sub-MoE this downlink's experts make, loaded and prepared."""
        keep = None if self.folder is None else algorithm.client_experts(received)
        if self.folder is None or keep is None:
            return shared
        model = load_sub_moe(
            self.folder, keep, dtype=self.dtype, device=self.device, experts_implementation=self.experts_implementation
        )
        algorithm.prepare_client_model(model)
        return model


@dataclass(frozen=True)
class Setting:
    """Everything a runtime needs besides the run directory."""

    config: ExperimentConfig
    loaded: LoadedModel
    algorithm: Algorithm
    template: PromptTemplate
    clients: tuple[ClientData, ...]
    union: EvalSet | None
    probes: tuple[KnowledgeProbe, ...]
    mmlu: tuple[MMLUQuestion, ...] = ()
    """``eval.mmlu``'s questions (at most ``eval.mmlu_examples`` per subject), for the final evaluation."""
    client_models: ClientModels = field(default_factory=ClientModels)

    @property
    def model(self) -> nn.Module:
        """The base model the algorithm was prepared on (on a Flower node of sub-MoE clients: on the meta device)."""
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        """Where client models live."""
        if self.client_models.folder is not None:
            return torch.device(self.client_models.device)
        return next(self.model.parameters()).device

    def client_model(self, received: Payload) -> nn.Module:
        """The model a client step with this downlink works on (see :class:`ClientModels`)."""
        return self.client_models.model_for(self.algorithm, self.model, received)

    def client(self, client_id: str) -> ClientData:
        for client in self.clients:
            if client.client_id == client_id:
                return client
        raise KeyError(f"{client_id} is not one of this process's clients")

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def layout(self) -> BatchLayout:
        """How the base model reads a token row: one sequence, or encoder and decoder (from its config)."""
        return batch_layout(self.model)


def _model_source(config: ExperimentConfig) -> Any:
    """``model.name`` as ``load_model`` takes it: ``builtin`` (or ``builtin:RECIPE``) is a pretrained
    ExpertBench MoE's folder (built on first use)."""
    name = config.model.name
    if name == BUILTIN_MODEL or name.startswith(f"{BUILTIN_MODEL}:"):
        from fedexperts.models.builtin import default_model_path

        return default_model_path(name.partition(":")[2] or "default")
    return name


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(config: ExperimentConfig) -> LoadedModel:
    """The base model (``builtin``: see :func:`_model_source`)."""
    return load_model(
        _model_source(config),
        dtype=config.model.dtype,
        device=_device(),
        experts_implementation=config.model.experts_implementation,
        trust_remote_code=config.model.trust_remote_code,
    )


def sub_moe_clients(config: ExperimentConfig) -> ClientModels:
    """Clients that load their sub-MoEs from the checkpoint folder of ``model.name``."""
    folder = Path(str(_model_source(config))).expanduser()
    if not folder.is_dir():
        raise FedExpertsError(
            f"model.name={config.model.name!r}: clients that load only their sub-MoE read the checkpoint's files, "
            "so the model must be builtin or a local folder (download a hub model first)"
        )
    if config.model.trust_remote_code:
        raise FedExpertsError("model.trust_remote_code: clients that load only their sub-MoE build stock models only")
    return ClientModels(folder, config.model.dtype, _device(), config.model.experts_implementation)


def federated_rows(config: ExperimentConfig) -> tuple[Partition, ExpertBench | None]:
    """Every client's raw train/test rows (in its own style on ExpertBench), and the bench if used."""
    spec = spec_from_config(config.data, config.federation.clients)
    if config.data.source == EXPERTBENCH:
        from fedexperts.models.builtin import RECIPES

        bench = ExpertBench.from_seed(RECIPES["default"].world_seed)
        return bench.federated(config.data.items, spec).partition, bench
    from fedexperts.data.partition import partition
    from fedexperts.data.sources import load_instructions

    loaded = load_instructions(config.data.source, columns=config.data.columns, skip_bad_rows=config.data.skip_bad_rows)
    return partition(loaded.dataset, spec), None


def tokenized(
    rows: datasets.Dataset,
    tokenizer: Any,
    template: PromptTemplate,
    config: ExperimentConfig,
    where: str,
    layout: BatchLayout = CAUSAL,
) -> TokenizedData:
    """``rows`` tokenized under ``data.max_length`` in ``layout``; a row that cannot fit is reported in config terms."""
    try:
        return tokenize_instructions(
            rows, tokenizer, max_length=config.data.max_length, template=template.kind, layout=layout
        )
    except OverlongRowError as error:
        raise DataError(
            f"{where}, row {error.row} cannot fit: {error.reason}; raise data.max_length "
            f"(now {config.data.max_length}) or shorten the data"
        ) from None


def eval_set(
    rows: datasets.Dataset,
    tokenizer: Any,
    template: PromptTemplate,
    config: ExperimentConfig,
    limit: int | None,
    seed: int,
    where: str = "test rows",
    layout: BatchLayout = CAUSAL,
) -> EvalSet:
    """A fixed, seeded subset of ``rows`` (at most ``limit``) with prompts, references and token rows."""
    if limit is not None and len(rows) > limit:
        chosen = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
        rows = rows.select(sorted(int(index) for index in chosen))
    tokens = tokenized(rows, tokenizer, template, config, where, layout)
    return EvalSet(
        prompts=tuple(
            template.prompt(tokenizer, instruction, context)
            for instruction, context in zip(rows["instruction"], rows["context"], strict=True)
        ),
        references=tuple(rows["response"]),
        rows=token_rows(tokens.dataset),
    )


def token_rows(dataset: datasets.Dataset) -> tuple[dict[str, list[int]], ...]:
    """The ``input_ids`` and ``labels`` of a tokenized dataset as one dict per row (what the collator takes)."""
    return tuple(
        {"input_ids": ids, "labels": labels}
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
    )


def build_setting(
    config: ExperimentConfig,
    *,
    only_clients: Sequence[int] | None = None,
    loaded: LoadedModel | None = None,
    evaluation: bool = True,
    node: bool = False,
) -> Setting:
    """Read and split the data, load the base model (unless given), prepare the algorithm, tokenize.

    ``only_clients`` restricts the tokenized clients (a Flower node builds its own partition only;
    a Flower server none). ``evaluation`` builds the union test set and probes, from every
    client's test rows; a server that never evaluates skips them, and with them the data. The data
    is read first, so a bad file fails before the model is loaded (or the built-in one pretrained).

    With ``federation.client_model = "sub-moe"``, or on a Flower ``node``, the clients of an
    algorithm that names its experts load only their sub-MoEs (:class:`ClientModels`); a node
    then prepares the algorithm on a meta-device model and never loads the full one.
    """
    wanted = range(config.federation.clients) if only_clients is None else only_clients
    rows = federated_rows(config) if wanted or evaluation else None
    algorithm = build_algorithm(
        config.algorithm, client_ids=client_ids(config.federation.clients), seed=config.federation.seed
    )
    if config.privacy.enabled:  # client-level DP around whichever algorithm (docs/privacy.md)
        from fedexperts.algorithms.privacy.wrapper import PrivateAlgorithm

        federation = config.federation
        algorithm = PrivateAlgorithm(
            algorithm,
            config.privacy,
            population=federation.clients,
            sample_size=round_size(federation.clients, federation.fraction, federation.min_clients),
        )
    clients = ClientModels()
    if algorithm.client_sub_moes and (node or config.federation.client_model == "sub-moe"):
        clients = sub_moe_clients(config)
        if node and loaded is None and clients.folder is not None:
            loaded = load_meta(
                clients.folder, dtype=clients.dtype, experts_implementation=clients.experts_implementation
            )
    loaded = loaded or load_base(config)
    torch.manual_seed(config.federation.seed)  # LoRA and other initialisations inside prepare
    algorithm.prepare(loaded.model)
    template = prompt_template(loaded.tokenizer)
    base = Setting(config, loaded, algorithm, template, (), None, (), client_models=clients)
    if rows is None:
        return base
    if evaluation:
        base = with_evaluation(base, rows)
    return with_clients(base, wanted, rows)


def with_clients(setting: Setting, wanted: Iterable[int], rows: tuple[Partition, ExpertBench | None]) -> Setting:
    """``setting`` (same model, algorithm and evaluation sets) holding the tokenized data of clients ``wanted``.

    ``rows`` is :func:`federated_rows` of the setting's config.
    """
    config, tokenizer, template = setting.config, setting.tokenizer, setting.template
    parts, _bench = rows
    ids = client_ids(config.federation.clients)
    wanted = set(wanted)
    clients = []
    for split in parts.clients:
        if split.client not in wanted:
            continue
        if len(split.train) == 0 or len(split.test) == 0:
            raise DataError(
                f"{ids[split.client]} has {len(split.train)} training and {len(split.test)} test rows; "
                "every client needs both (use fewer clients, more data.items or a larger data.test_fraction)"
            )
        train_split, validation_split = hold_out_validation(
            split.train,
            config.validation_fraction,
            derived_seed(config.data.seed, split.client, 2),
            client=ids[split.client],
        )
        train = tokenized(
            train_split, tokenizer, template, config, f"{ids[split.client]}'s training rows", setting.layout
        )
        validation = None
        if validation_split is not None:
            validation = eval_set(
                validation_split,
                tokenizer,
                template,
                config,
                config.eval.max_examples,
                derived_seed(config.data.seed, split.client, 3),
                f"{ids[split.client]}'s validation rows",
                setting.layout,
            )
        test = eval_set(
            split.test,
            tokenizer,
            template,
            config,
            config.eval.max_examples,
            derived_seed(config.data.seed, split.client),
            f"{ids[split.client]}'s test rows",
            setting.layout,
        )
        train_rows = token_rows(train.dataset)
        categories = (
            Counter(str(name) for name in train_split["category"]) if "category" in train_split.column_names else {}
        )
        clients.append(ClientData(ids[split.client], split.client, train_rows, test, dict(categories), validation))
    return replace(setting, clients=tuple(clients))


def with_evaluation(setting: Setting, rows: tuple[Partition, ExpertBench | None]) -> Setting:
    """``setting`` with the union test set and the knowledge probes, built from every client's test rows.

    With ``eval.mmlu``, also its questions (read here, so a missing or bad file fails before any round).
    """
    config, tokenizer, template = setting.config, setting.tokenizer, setting.template
    parts, bench = rows
    union = None
    if config.eval.union_examples:
        pooled = (  # held-out test rows are shared by clients: pool each row once
            parts.held_out
            if parts.held_out is not None
            else datasets.concatenate_datasets([split.test for split in parts.clients])
        )
        union = eval_set(
            pooled,
            tokenizer,
            template,
            config,
            config.eval.union_examples,
            config.data.seed,
            "the union test rows",
            setting.layout,
        )
    probes: tuple[KnowledgeProbe, ...] = ()
    if bench is not None and config.eval.probes:
        every = bench.probes(seed=config.data.seed)
        chosen = np.random.default_rng(config.data.seed).choice(
            len(every), size=min(config.eval.probes, len(every)), replace=False
        )
        probes = tuple(every[int(index)] for index in sorted(chosen))
    mmlu: tuple[MMLUQuestion, ...] = ()
    if config.eval.mmlu is not None:
        mmlu = load_mmlu(config.eval.mmlu, per_subject=config.eval.mmlu_examples, seed=config.data.seed)
    return replace(setting, union=union, probes=probes, mmlu=mmlu)

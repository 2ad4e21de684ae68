"""A node's cache of what each ClientApp process would rebuild: the base model and the tokenized partitions.

Flower starts a fresh ClientApp process for every message in a deployment (flwr issue #3670), and a
simulation's Ray actors each build their clients once. Without this, each of them loads the base
model through ``from_pretrained``, generates or reads the whole federation's rows and tokenizes its
partition. The cache keeps, under ``cache-dir`` (node config; default ``$FEDEXPERTS_CACHE/node-cache``):

- ``model-HASH/``: the loaded base model's tensors (:mod:`fedexperts.models.mapped`), memory-mapped
  by every process that uses it; keyed by the checkpoint (path, and each file's size and mtime),
  ``model.dtype``, ``model.experts_implementation`` and the torch and transformers versions;
- ``partition-HASH/``: one client's tokenized train, test and validation rows and categories (JSON);
- ``evaluation-HASH/``: the union test set and the knowledge probes (JSON); both keyed by the model's
  key (its tokenizer), the ``data`` section, ``federation.clients``, the validation fraction, the
  ``eval`` sizes, the data files' sizes and mtimes, the fedexperts version, and the partition.

Each entry is a folder written atomically with a ``manifest.json`` of its key and of each file's
size and sha256 (a file over :data:`HASHED_BYTES`: its size, mtime and safetensors header instead),
checked every time a process opens it; one that does not match is logged and rebuilt, never used.
Builders of one entry take turns on a lock file (``fcntl.flock``, released by the kernel if a builder
dies), so two processes that miss at once build it once. Delete the folder to clear it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers

import fedexperts
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.atomic import TEMPORARY, atomic_directory, atomic_file
from fedexperts.config import BUILTIN_MODEL, ExperimentConfig
from fedexperts.data.expertbench import ExpertBench, KnowledgeProbe
from fedexperts.data.expertbench.world import Fact
from fedexperts.data.mmlu import MMLUQuestion, load_mmlu
from fedexperts.data.partition import Partition
from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import EvalSet
from fedexperts.experiment import (
    ClientData,
    Setting,
    build_setting,
    client_ids,
    federated_rows,
    load_base,
    with_clients,
    with_evaluation,
)
from fedexperts.models.load import LoadedModel
from fedexperts.models.mapped import load_mapped, read_header, save_mapped

logger = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when what an entry holds changes: a new format is a new key."""
MANIFEST = "manifest.json"
HASHED_BYTES = 1 << 28
"""Files up to this size are checked by sha256 on every open; larger ones by size, mtime and header."""


def model_source(config: ExperimentConfig) -> str:
    """``model.name`` as a checkpoint folder (the built-in model's, built on first use) or a hub name."""
    name = config.model.name
    if name == BUILTIN_MODEL or name.startswith(f"{BUILTIN_MODEL}:"):
        from fedexperts.models.builtin import default_model_path

        return str(default_model_path(name.partition(":")[2] or "default"))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


def _stats(path: Path) -> dict[str, list[int]]:
    """Size and mtime of ``path`` (a file), or of every file under it (a folder); empty for a hub name."""
    if path.is_file():
        return {path.name: [path.stat().st_size, path.stat().st_mtime_ns]}
    if not path.is_dir():
        return {}
    files = sorted(file for file in path.rglob("*") if file.is_file())
    return {str(file.relative_to(path)): [file.stat().st_size, file.stat().st_mtime_ns] for file in files}


def model_key(config: ExperimentConfig) -> dict[str, Any]:
    """What decides the base model's tensors (and its tokenizer)."""
    source = model_source(config)
    return {
        "format": FORMAT,
        "source": source,
        "files": _stats(Path(source)),
        "dtype": config.model.dtype,
        "experts_implementation": config.model.experts_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def data_key(config: ExperimentConfig) -> dict[str, Any]:
    """What decides every client's tokenized rows: the tokenizer, the data, the split and the eval sizes."""
    return {
        "model": model_key(config),
        "data": config.data.model_dump(mode="json"),
        "data_files": _stats(Path(config.data.source).expanduser()),
        "clients": config.federation.clients,
        "validation_fraction": config.validation_fraction,
        "max_examples": config.eval.max_examples,
        "fedexperts": fedexperts.__version__,
    }


def evaluation_key(config: ExperimentConfig) -> dict[str, Any]:
    return {**data_key(config), "union_examples": config.eval.union_examples, "probes": config.eval.probes}


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    """What the manifest records of one file."""
    size = path.stat().st_size
    if size <= HASHED_BYTES:
        return {"bytes": size, "sha256": _sha256(path)}
    start, _header, _metadata = read_header(path)
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(start)).hexdigest()
    return {"bytes": size, "mtime_ns": path.stat().st_mtime_ns, "header_sha256": head}


def _problem(folder: Path, key: Mapping[str, Any]) -> str | None:
    """Why the entry in ``folder`` cannot be used for ``key`` (``None``: it can)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "has no manifest"
    except (OSError, ValueError) as error:
        return f"has an unreadable manifest ({error})"
    if not isinstance(manifest, dict) or manifest.get("key") != json.loads(json.dumps(key)):
        return "was built for other settings"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "lists no files"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != expected.get("bytes"):
            return f"has {name} of {path.stat().st_size} bytes, {expected.get('bytes')} expected"
        try:
            if _describe(path) != expected:
                return f"has {name} changed since it was written (its hash differs)"
        except FedExpertsError as error:
            return str(error)
    return None


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held until the block ends or the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class NodeCache:
    """The cache folder of one node (or of every node and actor on one machine)."""

    root: Path

    def entry(self, kind: str, key: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
        """The folder of a valid ``kind`` entry for ``key``; ``build(folder)`` writes it first if there is none.

        An entry that fails its manifest's checks is logged and rebuilt. Builders take turns: the
        second finds the first one's entry when it gets the lock.
        """
        name = f"{kind}-{digest(key)}"
        folder = self.root / name
        problem = _problem(folder, key) if folder.exists() else "missing"
        if problem is None:
            return folder
        self.root.mkdir(parents=True, exist_ok=True)
        with _lock(self.root / f".{name}.lock"):
            problem = _problem(folder, key) if folder.exists() else "missing"
            if problem is None:
                return folder
            if problem != "missing":
                logger.warning("node cache: %s %s; rebuilding it", folder, problem)
            for leftover in self.root.glob(f".{name}.*"):  # a builder killed mid-write (we hold the lock)
                if TEMPORARY.match(leftover.name) or leftover.name.endswith(".old"):
                    shutil.rmtree(leftover, ignore_errors=True)
            with atomic_directory(folder) as staging:
                build(staging)
                files = {path.name: _describe(path) for path in sorted(staging.iterdir())}
                manifest = {"kind": kind, "key": key, "files": files}
                with atomic_file(staging / MANIFEST) as path:
                    path.write_text(json.dumps(manifest, indent=1))
        return folder

    def model_file(self, config: ExperimentConfig, build: Callable[[Path], None]) -> Path:
        """The cached base model's tensors file; ``build(path)`` writes it on a miss."""
        return self.entry("model", model_key(config), lambda folder: build(folder / "model.safetensors")) / (
            "model.safetensors"
        )

    def json_entry(self, kind: str, key: Mapping[str, Any], make: Callable[[], Any]) -> Any:
        """The JSON value a ``kind`` entry for ``key`` holds; ``make()`` gives it on a miss."""

        def build(folder: Path) -> None:
            (folder / f"{kind}.json").write_text(json.dumps(make(), separators=(",", ":")))

        folder = self.entry(kind, key, build)
        try:
            return json.loads((folder / f"{kind}.json").read_text())
        except (OSError, ValueError) as error:
            raise FedExpertsError(f"node cache: {folder}: cannot read {kind}.json ({error}); delete it") from None


class FederatedRows:
    """The federation's raw rows (:func:`~fedexperts.experiment.federated_rows`), read on the first miss only."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self._rows: tuple[Partition, ExpertBench | None] | None = None

    def __call__(self) -> tuple[Partition, ExpertBench | None]:
        if self._rows is None:
            self._rows = federated_rows(self.config)
        return self._rows


def _loads_base_model(config: ExperimentConfig) -> bool:
    """Whether a node's setting holds the full base model (not for algorithms whose nodes load sub-MoEs)."""
    ids = client_ids(config.federation.clients)
    algorithm = build_algorithm(config.algorithm, client_ids=ids, seed=config.federation.seed)
    return not algorithm.client_sub_moes and not config.model.trust_remote_code


def cached_model(config: ExperimentConfig, cache: NodeCache) -> LoadedModel:
    """The base model, memory-mapped from the cache (loaded and written there on a miss)."""
    path = cache.model_file(config, lambda target: save_mapped(load_base(config).model, target))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_mapped(
        model_source(config), path, device=device, experts_implementation=config.model.experts_implementation
    )


def node_base(config: ExperimentConfig, cache: NodeCache, rows: FederatedRows) -> Setting:
    """A node's setting without client data, its base model and evaluation sets from the cache.

    The same as ``with_evaluation(build_setting(config, only_clients=[], evaluation=False, node=True), rows)``.
    A FedMoE node's model stays on the meta device (:func:`~fedexperts.experiment.build_setting`).
    """
    loaded = cached_model(config, cache) if _loads_base_model(config) else None
    base = build_setting(config, only_clients=[], evaluation=False, node=True, loaded=loaded)

    def make() -> Any:
        built = with_evaluation(base, rows())
        return {"union": _eval_json(built.union), "probes": [_probe_json(probe) for probe in built.probes]}

    value = cache.json_entry("evaluation", evaluation_key(config), make)
    mmlu: tuple[MMLUQuestion, ...] = ()
    if config.eval.mmlu is not None:
        mmlu = load_mmlu(config.eval.mmlu, per_subject=config.eval.mmlu_examples, seed=config.data.seed)
    probes = tuple(_probe(entry) for entry in value["probes"])
    return replace(base, union=_eval_set(value["union"]), probes=probes, mmlu=mmlu)


def node_client(base: Setting, cache: NodeCache, partition: int, rows: FederatedRows) -> ClientData:
    """Client ``partition``'s tokenized data from the cache (``with_clients(base, [partition], rows)``'s)."""
    key = {**data_key(base.config), "partition": partition}
    value = cache.json_entry("partition", key, lambda: _client_json(with_clients(base, [partition], rows()).clients[0]))
    return ClientData(
        client_id=value["client_id"],
        index=value["index"],
        train=tuple(value["train"]),
        test=_required(_eval_set(value["test"])),
        categories=value["categories"],
        validation=_eval_set(value["validation"]),
    )


def warm(config: ExperimentConfig, cache: NodeCache, partitions: Iterable[int]) -> None:
    """Build the cache's entries of ``partitions`` now (a simulation, before its actors start)."""
    rows = FederatedRows(config)
    base = node_base(config, cache, rows)
    for partition in partitions:
        node_client(base, cache, partition, rows)


def _required(value: EvalSet | None) -> EvalSet:
    if value is None:
        raise FedExpertsError("node cache: a partition entry without its test rows; delete the cache folder")
    return value


def _eval_json(value: EvalSet | None) -> Any:
    if value is None:
        return None
    return {"prompts": list(value.prompts), "references": list(value.references), "rows": [dict(r) for r in value.rows]}


def _eval_set(value: Any) -> EvalSet | None:
    if value is None:
        return None
    return EvalSet(tuple(value["prompts"]), tuple(value["references"]), tuple(value["rows"]))


def _client_json(client: ClientData) -> dict[str, Any]:
    return {
        "client_id": client.client_id,
        "index": client.index,
        "train": list(client.train),
        "test": _eval_json(client.test),
        "categories": client.categories,
        "validation": _eval_json(client.validation),
    }


def _probe_json(probe: KnowledgeProbe) -> dict[str, Any]:
    fact = {"subject": probe.fact.subject, "relation": probe.fact.relation, "value": probe.fact.value}
    return {"fact": fact, "prompt": probe.prompt, "choices": list(probe.choices), "answer_index": probe.answer_index}


def _probe(value: Mapping[str, Any]) -> KnowledgeProbe:
    return KnowledgeProbe(Fact(**value["fact"]), value["prompt"], tuple(value["choices"]), value["answer_index"])

"""Load only a sub-MoE from a checkpoint: the dense part and the rows of the kept experts.

What a memory-constrained client does (FedMoE): the model is built from its config on the meta
device (no weights), pruned with :func:`~fedexperts.moe.select_experts` (which records the
local-to-global expert map), and then every tensor is materialised from the ``*.safetensors``
files, reading with ``get_slice`` only the kept experts' rows of each expert-row tensor (router
rows and biases, fused experts). Per-expert hub tensors are fused for the kept experts only, as
transformers' conversion mapping fuses all of them (:mod:`fedexperts.moe.checkpoints`). Where each
expert is a module of its own (Switch Transformers), the sub-MoE's module ``expert_{j}`` is read
from the checkpoint's ``expert_{g}``, ``g`` the global expert it holds, and the other experts'
modules are never read. Tensors are cast and moved one at a time, so the full model never exists
in memory. Non-persistent buffers (rotary frequencies) are computed by the model's own
initialiser, as ``from_pretrained`` does; tied weights stay one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import FedExpertsError
from fedexperts.models.load import (
    LoadedModel,
    load_tokenizer,
    model_class_for,
    note_wrapper,
    refuse_local_remote_code,
    resolve_dtype,
)
from fedexperts.moe.checkpoints import CheckpointNaming, checkpoint_naming
from fedexperts.moe.families import family_for, moe_layers
from fedexperts.moe.rows import full_model_names
from fedexperts.moe.surgery import expert_map, initialise_non_persistent_buffers, select_experts

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def meta_model(config: Any, dtype: torch.dtype, *, experts_implementation: str | None = None) -> PreTrainedModel:
    """The model of ``config`` on the ``meta`` device: every parameter's shape and dtype, no storage.

    Algorithms prepare on it exactly as on a real model (planning plays whole rounds on it; a
    node learns its layout): every step only creates, slices, clones or copies tensors, which meta
    tensors support. peft creates LoRA layers in the default dtype and moves them to the base
    layer's device and dtype, so adapters land on ``meta`` in the base dtype, as they land on the
    CPU or GPU for a loaded model; ``prepare`` then makes what trains float32 on meta too. Meta
    tensors cannot be serialised: their wire size is :func:`fedexperts.federation.payload.payload_size`.
    """
    options: dict[str, Any] = {"dtype": dtype}
    if experts_implementation is not None:
        options["experts_implementation"] = experts_implementation
    with torch.device("meta"):
        model: PreTrainedModel = model_class_for(config).from_config(config, **options)
    return model


def read_config(folder: Path) -> Any:
    """The checkpoint's config (refusing shipped model code), with a clear error for a missing one."""
    if not (folder / "config.json").is_file():
        raise FedExpertsError(f"{folder}: no config.json; not a model folder")
    refuse_local_remote_code(folder)
    return transformers.AutoConfig.from_pretrained(folder)


def load_meta(
    folder: str | Path, *, dtype: str | torch.dtype = "float32", experts_implementation: str | None = None
) -> LoadedModel:
    """A checkpoint's tokenizer and its model on the meta device: enough to prepare an algorithm on.

    A Flower node whose clients load sub-MoEs learns the algorithm's roles and layout from this
    (sizes come out in ``dtype``, as for the real model) and never holds the full model.
    """
    source = Path(folder).expanduser()
    config = read_config(source)
    model = meta_model(config, _target_dtype(config, dtype), experts_implementation=experts_implementation)
    note_wrapper(model, config)
    moe_layers(model)
    return LoadedModel(model=model, tokenizer=load_tokenizer(source), family=family_for(model), source=str(source))


def load_sub_moe(
    folder: str | Path,
    keep: Mapping[str, Sequence[int]] | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    experts_implementation: str | None = None,
) -> PreTrainedModel:
    """The sub-MoE of the checkpoint in ``folder`` that keeps the experts ``keep`` names, in eval mode.

    ``keep`` maps MoE layer names to *global* expert indices, in the order the sub-MoE holds them
    (as for :func:`~fedexperts.moe.select_experts`; layers not named keep every expert).
    ``keep=None`` loads the whole model the same way, one tensor at a time. The result equals
    ``select_experts(full_model, keep)`` tensor for tensor, and its expert map says which global
    expert each local one is. A missing tensor, a shape that does not fit the config or an
    unreadable file is a :class:`FedExpertsError` naming the file.
    """
    source = Path(folder).expanduser()
    config = read_config(source)
    naming = checkpoint_naming(config)
    model = meta_model(config, _target_dtype(config, dtype), experts_implementation=experts_implementation)
    if keep:
        select_experts(model, keep)
    rows, columns = _expert_rows(model)
    modules = full_model_names(model)
    with _Checkpoint(source, naming) as checkpoint:
        compute_non_persistent_buffers(model, torch.device(device))
        for names, tensor in unique_tensors(model):
            stored = [modules.get(name, name) for name in names]
            value = checkpoint.read(stored, tensor, rows.get(names[0]), columns.get(names[0]))
            assign_tensor(model, names, value.to(device=device, dtype=tensor.dtype), tensor)
    generation = source / "generation_config.json"
    if generation.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(source)
    model.eval()
    return model


def _target_dtype(config: Any, dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype; ``auto``: the config's own, float32 when it declares none."""
    resolved = resolve_dtype(dtype)
    if isinstance(resolved, torch.dtype):
        return resolved
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _expert_rows(model: PreTrainedModel) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Each expert-row (and expert-column) tensor's name -> the global experts it holds, in local order."""
    mapping = expert_map(model).local_to_global
    rows: dict[str, list[int]] = {}
    columns: dict[str, list[int]] = {}
    for layer in moe_layers(model):
        held = list(mapping[layer.name])
        for name in layer.expert_row_names():
            rows[name] = held
        for tensor in layer.family.expert_tensors:
            rows[f"{layer.experts_name}.{tensor}"] = held
        columns.update(dict.fromkeys(layer.expert_column_names(), held))
    return rows, columns


def unique_tensors(model: nn.Module) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Every parameter and persistent buffer once, with all the names it has (tied weights share one)."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *_persistent_buffers(model)]:
        names.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    for key, tensor in tensors.items():
        yield names[key], tensor


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def compute_non_persistent_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Give non-persistent buffers real storage and let the model's initialiser compute them.

    It runs before any weight is loaded: their modules' parameters are still on meta, where
    initialising does nothing.
    """
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    initialise_non_persistent_buffers(model)


def assign_tensor(model: nn.Module, names: Sequence[str], value: torch.Tensor, old: torch.Tensor) -> None:
    """Put ``value`` in place of ``old`` under every one of its names (one object, so ties survive)."""
    new: torch.Tensor = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if leaf in owner._parameters:
            owner._parameters[leaf] = new  # type: ignore[assignment]
        else:
            owner._buffers[leaf] = new


class _Checkpoint:
    """The tensors of a folder's safetensors files under the model's names, read lazily."""

    def __init__(self, folder: Path, naming: CheckpointNaming) -> None:
        self.folder = folder
        self.naming = naming
        self.files = _weight_files(folder)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.where: dict[str, tuple[str, str]] = {}
        """Model name -> (file, name in the file)."""

    def __enter__(self) -> _Checkpoint:
        for file in self.files:
            with _reading(self.folder / file):
                handle = self._stack.enter_context(safe_open(self.folder / file, framework="pt", device="cpu"))
            self._handles[file] = handle
            for stored in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self.where.setdefault(self.naming.model_name(stored), (file, stored))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(
        self, names: Sequence[str], like: torch.Tensor, rows: Sequence[int] | None, columns: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The tensor under one of ``names`` (only ``rows`` or last-axis ``columns``, if given), shaped as ``like``."""
        value = self._read(names, rows)
        if columns is not None:  # a small per-expert vector (ERNIE's correction bias): read whole, then slice
            value = value.index_select(-1, torch.tensor(list(columns), dtype=torch.long))
        if value.shape != like.shape:
            raise FedExpertsError(
                f"{self.folder}: {names[0]} has shape {tuple(value.shape)} in the checkpoint, "
                f"the config gives {tuple(like.shape)}"
            )
        return value

    def _read(self, names: Sequence[str], rows: Sequence[int] | None) -> torch.Tensor:
        stored = next((name for name in names if name in self.where), None)
        if stored is not None:
            return self._slice(stored, rows)
        experts, _, fused = names[0].rpartition(".")
        parts = self.naming.per_expert.get(fused, ())
        if rows is None or not parts:
            raise FedExpertsError(f"{self.folder}: the checkpoint has no tensor {names[0]}")
        return torch.stack([torch.cat([self._slice(f"{experts}.{row}.{part}") for part in parts]) for row in rows])

    def _slice(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        if name not in self.where:
            raise FedExpertsError(f"{self.folder}: the checkpoint has no tensor {name}")
        file, stored = self.where[name]
        with _reading(self.folder / file):
            view = self._handles[file].get_slice(stored)
            if rows is None:
                return view[:]
            count = view.get_shape()[0]
            if any(not 0 <= row < count for row in rows):
                raise FedExpertsError(f"{self.folder / file}: {stored} has {count} expert rows; asked for {list(rows)}")
            return torch.cat([view[start:stop] for start, stop in _runs(rows)])


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """``rows`` as ``[start, stop)`` runs of consecutive indices, in order (one read per run)."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint: its index's shards, else ``model.safetensors``, else every one."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise FedExpertsError(f"{index}: not a safetensors index (no weight_map of file names)") from error
        missing = [file for file in files if not (folder / file).is_file()]
        if missing:
            raise FedExpertsError(f"{index} names shards that are not in {folder}: {missing[:3]}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    files = sorted(path.name for path in folder.glob("*.safetensors"))
    if not files:
        raise FedExpertsError(f"{folder}: no *.safetensors weights (other formats are not read)")
    return files


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """safetensors' own errors (a truncated or corrupt file) as one line naming the file."""
    try:
        yield
    except (SafetensorError, OSError) as error:
        raise FedExpertsError(f"{path}: cannot read the weights ({str(error).strip().splitlines()[0]})") from error

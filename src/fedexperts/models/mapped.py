"""A loaded model's own tensors as one safetensors file, and the model back from it, memory-mapped.

What a Flower node's cache holds (:mod:`fedexperts.federation.flower.nodecache`). ``from_pretrained``
memory-maps a checkpoint too, but builds transformers' conversion mapping and fuses per-expert
tensors into new copies (most of an MoE's bytes) every time; a process started per message pays
that for each message. :func:`save_mapped`
writes the loaded model's tensors once, in the model's own names, dtypes and layout (tied weights
once). :func:`load_mapped` builds the model on the meta device (no initialisation) and points every
parameter and buffer at its bytes in a private memory map of that file (no copy): pages are read on
first touch and shared by every process that maps the file (Ray actors), and a process that writes a
weight in place gets its own copy of that page, never a change to the file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any, cast

import torch
import transformers

from fedexperts.atomic import save_tensors
from fedexperts.errors import FedExpertsError
from fedexperts.models.load import LoadedModel, load_tokenizer, note_wrapper
from fedexperts.models.partial import assign_tensor, compute_non_persistent_buffers, meta_model, unique_tensors
from fedexperts.moe.families import family_for, moe_layers

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors' dtype names for the dtypes a model's tensors come in."""


DTYPE = "dtype"
"""The file's metadata key for the model's dtype (what it is rebuilt in; a tensor kept in float32 is checked)."""


def save_mapped(model: transformers.PreTrainedModel, path: Path) -> None:
    """Write every parameter and persistent buffer of ``model`` once (a tie under its first name), atomically."""
    tensors = {names[0]: tensor for names, tensor in unique_tensors(model)}
    save_tensors(path, tensors, {DTYPE: str(model.dtype).removeprefix("torch.")})


def read_header(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(where the data starts, {name: {dtype, shape, data_offsets}}, metadata)`` of a safetensors file.

    The offsets must tile the data section exactly and end at the end of the file: a truncated or
    padded file is refused.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise FedExpertsError(f"{path}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise FedExpertsError(f"{path}: its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise FedExpertsError(f"{path}: the safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise FedExpertsError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    spans = sorted(tuple(entry.get("data_offsets", (-1, -1))) for entry in header.values())
    end = 0
    for start, stop in spans:
        if start != end or stop < start:
            raise FedExpertsError(f"{path}: tensor data offsets do not tile the file (a gap or overlap at {start})")
        end = stop
    if 8 + length + end != size:
        raise FedExpertsError(f"{path}: the tensors need {8 + length + end} bytes but the file has {size}")
    return 8 + length, header, metadata


def map_tensors(model: transformers.PreTrainedModel, path: Path) -> None:
    """Point every parameter and persistent buffer of the meta-device ``model`` at its bytes in ``path``.

    Each name, dtype and shape must be the model's: anything missing, extra or different is refused.
    Non-persistent buffers (rotary frequencies) are computed by the model's initialiser first.
    """
    start, header, _metadata = read_header(path)
    storage = cast(
        torch.UntypedStorage, torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    )
    compute_non_persistent_buffers(model, torch.device("cpu"))
    seen = set()
    for names, tensor in unique_tensors(model):
        name = names[0]
        entry = header.get(name)
        if entry is None:
            raise FedExpertsError(f"{path}: no tensor {name}")
        dtype, shape = _DTYPES.get(str(entry.get("dtype"))), list(entry.get("shape", ()))
        if dtype != tensor.dtype or shape != list(tensor.shape):
            raise FedExpertsError(
                f"{path}: {name} is {entry.get('dtype')} {shape}, the model has {tensor.dtype} {list(tensor.shape)}"
            )
        offset = start + int(entry["data_offsets"][0])
        if offset % tensor.element_size():
            raise FedExpertsError(f"{path}: {name} is not aligned to its dtype; the file was not written here")
        strides = torch.empty(tensor.shape, device="meta").stride()  # row-major, as safetensors stores it
        view = torch.empty(0, dtype=dtype).set_(storage, offset // tensor.element_size(), tensor.shape, strides)
        assign_tensor(model, names, view, tensor)
        seen.add(name)
    extra = sorted(set(header) - seen)
    if extra:
        raise FedExpertsError(f"{path}: holds tensors the model does not have: {extra[:3]}")


def load_mapped(
    source: str,
    path: Path,
    *,
    device: str | torch.device = "cpu",
    experts_implementation: str | None = None,
) -> LoadedModel:
    """The model of checkpoint ``source`` (config, tokenizer, generation config) with the tensors of ``path``.

    ``path`` is what :func:`save_mapped` wrote for the model ``load_model(source, ...)`` loaded with
    the same options (the model is rebuilt in the dtype the file records); the result equals that
    model tensor for tensor, in eval mode on ``device`` (off the CPU the tensors are copied there).
    Stock model classes only (no ``trust_remote_code``).
    """
    config = transformers.AutoConfig.from_pretrained(source)
    dtype = getattr(torch, read_header(path)[2].get(DTYPE, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise FedExpertsError(f"{path}: no model dtype in its metadata; the file was not written by save_mapped")
    model = meta_model(config, dtype, experts_implementation=experts_implementation)
    map_tensors(model, path)
    if model.can_generate():  # as from_pretrained: the checkpoint's generation config where it has one
        with contextlib.suppress(OSError):
            model.generation_config = transformers.GenerationConfig.from_pretrained(source)
    note_wrapper(model, config)
    movable: Any = model
    movable.to(device).eval()
    tokenizer = load_tokenizer(source)
    family = family_for(model)
    moe_layers(model)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=source)

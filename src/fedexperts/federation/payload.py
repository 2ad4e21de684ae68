"""What crosses the wire: named tensors plus small JSON metadata, as safetensors bytes.

safetensors is the format (no pickle, bf16 supported, a bounded JSON header); this module adds
the metadata convention and exact byte accounting (the length of the encoded message). What a
message *is* (:class:`~fedexperts.interface.Payload`) and how a server validates a reply belong to
the algorithm contract in :mod:`fedexperts.interface`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedexperts.interface import Payload, PayloadError

_METADATA_KEY = "fedexperts"
DTYPES_FIELD = "__dtypes__"
"""Reserved metadata key: the original dtypes of tensors cast for transfer."""


def encode(payload: Payload, *, dtype: torch.dtype | None = None) -> bytes:
    """Serialize to safetensors bytes; ``dtype`` casts floating tensors for transfer (e.g. float16).

    Cast tensors get their original dtype back in :func:`decode`, so a receiver never averages
    half-precision copies into full-precision state by accident.
    """
    tensors, cast = cast_for_transfer(payload.tensors, dtype)
    return save(tensors, metadata={_METADATA_KEY: metadata_json(payload.metadata, cast)})


# -- size without bytes ----------------------------------------------------------------------------
# safetensors' dtype names, in the order of its ``Dtype`` enum: ``serialize`` lays tensors out by
# descending rank, then by name, and the data offsets in the header follow that order.
_SAFETENSORS_ORDER = (
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, name): code for name, code in _SAFETENSORS_ORDER if hasattr(torch, name)
}  # a dtype this torch lacks (older releases) simply cannot occur
_SAFETENSORS_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}

TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""A tensor as the wire sizes it: ``(shape, dtype)``."""


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _wire_dtype(dtype: torch.dtype, transfer_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``encode`` writes: floating tensors are cast to ``transfer_dtype`` when one is given."""
    return transfer_dtype if transfer_dtype is not None and dtype.is_floating_point else dtype


def encoded_header(
    shapes_and_dtypes: Mapping[str, TensorSpec], metadata: dict[str, Any], *, dtype: torch.dtype | None = None
) -> bytes:
    """The padded JSON header :func:`encode` writes for these tensors.

    Same layout as safetensors' ``serialize``: tensors sorted by descending dtype rank then name,
    consecutive data offsets, ``__metadata__`` first, compact JSON with raw UTF-8, padded with
    spaces to a multiple of 8 bytes.
    """
    entries = []
    cast = {}
    for name, (shape, stored) in shapes_and_dtypes.items():
        wire = _wire_dtype(stored, dtype)
        if wire not in _SAFETENSORS_DTYPES:
            raise PayloadError(f"{name}: safetensors cannot store dtype {wire}")
        if wire != stored:
            cast[name] = str(stored).removeprefix("torch.")
        entries.append((name, tuple(int(size) for size in shape), wire))
    entries.sort(key=lambda entry: (-_SAFETENSORS_RANK[entry[2]], entry[0]))
    header: dict[str, Any] = {"__metadata__": {_METADATA_KEY: metadata_json(metadata, cast)}}
    offset = 0
    for name, shape, wire in entries:
        end = offset + _numel(shape) * wire.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[wire], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def encoded_size(
    shapes_and_dtypes: Mapping[str, TensorSpec], metadata: dict[str, Any], *, dtype: torch.dtype | None = None
) -> int:
    """``len(encode(Payload(tensors, metadata), dtype=dtype))`` from shapes and dtypes alone.

    8-byte header length, the padded JSON header, then every tensor's bytes; works for tensors
    that have no storage (``meta``), which ``encode`` itself cannot serialise.
    """
    data = sum(_numel(shape) * _wire_dtype(stored, dtype).itemsize for shape, stored in shapes_and_dtypes.values())
    return 8 + len(encoded_header(shapes_and_dtypes, metadata, dtype=dtype)) + data


def payload_size(payload: Payload, *, dtype: torch.dtype | None = None) -> int:
    """Exact ``len(encode(payload, dtype=dtype))`` without encoding (its tensors may live on ``meta``)."""
    specs = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in payload.tensors.items()}
    return encoded_size(specs, payload.metadata, dtype=dtype)


def cast_for_transfer(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    *,
    widen: Mapping[torch.dtype, torch.dtype] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors as they travel (detached, contiguous, on CPU) and the original dtype of each one changed.

    Floating tensors are cast to ``dtype`` when one is given; otherwise a dtype the wire cannot
    hold is replaced by the wider one ``widen`` names (Flower: bfloat16 travels as float32).
    """
    sent, originals = {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        wire = dtype if dtype is not None and tensor.is_floating_point() else (widen or {}).get(tensor.dtype)
        if wire is not None and wire != tensor.dtype:
            originals[name] = str(tensor.dtype).removeprefix("torch.")
            tensor = tensor.to(wire)
        sent[name] = tensor
    return sent, originals


def restore_dtypes(tensors: dict[str, torch.Tensor], originals: Mapping[str, Any]) -> None:
    """Give each received tensor named in ``originals`` its dtype back (``ValueError`` on a bad entry)."""
    for name, original in originals.items():
        dtype = getattr(torch, str(original), None)
        if name not in tensors or not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype entry {name!r}: {original!r} names no tensor's dtype")
        tensors[name] = tensors[name].to(dtype)


def metadata_json(metadata: Mapping[str, Any], cast: Mapping[str, str]) -> str:
    """The one header string of a message: its metadata, plus the original dtypes of cast tensors.

    One string, because safetensors writes several metadata keys in a random order.
    """
    if DTYPES_FIELD in metadata:
        raise PayloadError(f"payload metadata may not use the reserved key {DTYPES_FIELD!r}")
    try:
        return json.dumps(
            {**metadata, DTYPES_FIELD: dict(cast)} if cast else dict(metadata), sort_keys=True, allow_nan=False
        )
    except (TypeError, ValueError) as error:
        raise PayloadError(f"payload metadata is not JSON-able: {error}") from error


def decode(data: bytes) -> Payload:
    """Parse bytes made by :func:`encode` (cast tensors restored); anything else is a :class:`PayloadError`."""
    try:
        tensors = load(data)
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        metadata = json.loads(header.get(_METADATA_KEY, "{}"))
        tensors = dict(tensors)
        restore_dtypes(tensors, metadata.pop(DTYPES_FIELD, {}))
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, RecursionError) as error:
        raise PayloadError(f"not a fedexperts message: {str(error)[:200] or type(error).__name__}") from error
    return Payload(tensors=tensors, metadata=metadata)


def transfer_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of ``federation.transfer_dtype`` (``None``: tensors travel as they are)."""
    return None if name is None else getattr(torch, name)

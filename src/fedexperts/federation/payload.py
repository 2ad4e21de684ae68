"""What crosses the wire: named tensors plus small JSON metadata, as safetensors bytes.

safetensors is the format (no pickle, bf16 supported, a bounded JSON header); this module adds
the metadata convention, exact byte accounting (the length of the encoded message) and the
validation a server runs on every reply before it aggregates anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedexperts.errors import FedExpertsError

_METADATA_KEY = "fedexperts"
DTYPES_FIELD = "__dtypes__"
"""Reserved metadata key: the original dtypes of tensors cast for transfer."""


class PayloadError(FedExpertsError):
    """A message that cannot be decoded, or an update that does not fit what the server expects."""


@dataclass(frozen=True)
class Payload:
    """Named tensors (the model's own parameter names) and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        """Raw bytes of the tensors alone (what the wire format adds on top is its overhead)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def encode(payload: Payload, *, dtype: torch.dtype | None = None) -> bytes:
    """Serialize to safetensors bytes; ``dtype`` casts floating tensors for transfer (e.g. float16).

    Cast tensors get their original dtype back in :func:`decode`, so a receiver never averages
    half-precision copies into full-precision state by accident.
    """
    tensors, cast = cast_for_transfer(payload.tensors, dtype)
    return save(tensors, metadata={_METADATA_KEY: metadata_json(payload.metadata, cast)})


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
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as error:
        raise PayloadError(f"not a fedexperts message: {error}") from error
    return Payload(tensors=tensors, metadata=metadata)


def transfer_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of ``federation.transfer_dtype`` (``None``: tensors travel as they are)."""
    return None if name is None else getattr(torch, name)


def validate_update(
    payload: Payload, expected: Mapping[str, torch.Tensor], *, sender: str, allow_missing: bool = False
) -> None:
    """Check a client's update against the tensors the server expects, before any averaging.

    Every key must be expected (and, unless ``allow_missing``, every expected key present), with
    the expected shape, a floating dtype, and only finite values.
    """
    unexpected = sorted(set(payload.tensors) - set(expected))
    if unexpected:
        raise PayloadError(f"{sender}: unexpected tensors {unexpected[:5]}")
    missing = sorted(set(expected) - set(payload.tensors))
    if missing and not allow_missing:
        raise PayloadError(f"{sender}: missing tensors {missing[:5]}")
    for name, tensor in payload.tensors.items():
        reference = expected[name]
        if tensor.shape != reference.shape:
            raise PayloadError(f"{sender}: {name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")
        if not tensor.is_floating_point():
            raise PayloadError(f"{sender}: {name} has dtype {tensor.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise PayloadError(f"{sender}: {name} has {bad} NaN/Inf values")


def check_metadata_numbers(metadata: Mapping[str, Any], *, sender: str) -> None:
    """Refuse non-finite numbers in metrics a client reports (they would poison averages)."""
    for key, value in metadata.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PayloadError(f"{sender}: metadata {key!r} is {value}")

"""The server's checks of a client's reply: one module, so the in-process and Flower runtimes cannot drift.

A reply is refused (recorded with the rule that refused it, never aggregated, its staged personal
state dropped) when it is larger than the round's plan allows, its metadata is not a bounded JSON
object, it is not bound to the message it answers (another client's id, another round, or not the
nonce the server issued for this message: a replayed old reply), or it claims an example count
outside ``1..`` the client's known training rows (a weighting attack). The tensors' names, shapes,
dtypes and values are the algorithm's to check (:meth:`~fedexperts.interface.Algorithm.check_update`,
:func:`~fedexperts.interface.validate_update`; FedMoE also refuses rows of experts the client
does not hold). Every message names the rule and counts, never a tensor's values.

Both transports call :func:`check_size` on what arrived before decoding it (Flower: on the record,
before its arrays become tensors) and :class:`~fedexperts.federation.server.Federation` calls
:func:`check_reply` on every decoded reply.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import torch

from fedexperts.federation.client import CLIENT_FIELD, NONCE_FIELD, ROUND_FIELD, ClientTask
from fedexperts.interface import EXAMPLES_KEY, ClientInfo, Payload, PayloadError

TENSOR_ROOM = 512
"""Bytes allowed per tensor beyond its data: its name and its header entry (safetensors JSON, Flower's npy)."""
MESSAGE_ROOM = 4096
"""Bytes allowed per message beyond its tensors and metadata (headers, the dtype map, Flower's records)."""
MAX_DEPTH = 8
"""How deeply a reply's metadata may nest (a deeper one is refused before it can exhaust the parser)."""


def new_nonce() -> str:
    """A fresh unguessable nonce for one message (32 hex characters: a fixed length, so byte counts stay exact)."""
    return secrets.token_hex(16)


def reply_byte_limit(global_state: Mapping[str, torch.Tensor], max_metadata_bytes: int) -> int:
    """The most bytes a legitimate reply can take: every shared tensor back, in at most 4 bytes per element for
    half dtypes (Flower widens bfloat16 to float32) and its own size otherwise, plus header room and metadata.

    No algorithm sends back more than the shared state (FedMoE: a slice of it, or per-expert vectors far
    smaller than its dense tensors); the exact names and shapes are checked once the reply is decoded.
    """
    data = sum(tensor.numel() * max(tensor.element_size(), 4) + TENSOR_ROOM for tensor in global_state.values())
    return data + max_metadata_bytes + MESSAGE_ROOM


def check_size(bytes_up: int, task: ClientTask) -> None:
    """Refuse a reply larger than the round's plan allows (:attr:`ClientTask.max_reply_bytes`)."""
    if task.max_reply_bytes is not None and bytes_up > task.max_reply_bytes:
        raise PayloadError(
            f"{task.client_id}: the reply is {bytes_up} bytes, more than the {task.max_reply_bytes} "
            "this round's plan allows",
            rule="size",
        )


def check_metadata_text(text: str, *, sender: str, limit: int) -> None:
    """Refuse metadata JSON text over ``limit`` bytes, before it is parsed."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > limit:
        raise PayloadError(
            f"{sender}: reply metadata is {size} bytes, more than federation.max_reply_metadata_bytes={limit}",
            rule="metadata",
        )


def _depth(value: object, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, Mapping):
        return max((_depth(item, level + 1) for item in value.values()), default=level + 1)
    if isinstance(value, list | tuple):
        return max((_depth(item, level + 1) for item in value), default=level + 1)
    return level


def check_metadata(metadata: object, *, sender: str, limit: int) -> None:
    """The metadata must be a JSON object of at most ``limit`` bytes, nested at most :data:`MAX_DEPTH` deep."""
    if not isinstance(metadata, dict) or not all(isinstance(key, str) for key in metadata):
        raise PayloadError(f"{sender}: reply metadata is not a JSON object with string keys", rule="metadata")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as error:
        raise PayloadError(f"{sender}: reply metadata is not JSON ({type(error).__name__})", rule="metadata") from None
    check_metadata_text(text, sender=sender, limit=limit)
    if _depth(metadata) > MAX_DEPTH:
        raise PayloadError(f"{sender}: reply metadata nests deeper than {MAX_DEPTH} levels", rule="metadata")


def check_binding(metadata: Mapping[str, Any], task: ClientTask) -> None:
    """The reply must answer this very message: the task's client, round and the nonce issued with it."""
    sender = task.client_id
    claimed = metadata.get(CLIENT_FIELD)
    if claimed != task.client_id:
        shown = repr(claimed) if isinstance(claimed, str) and len(claimed) <= 64 else "another id"
        raise PayloadError(f"{sender}: the reply claims to come from {shown}", rule="identity")
    claimed_round = metadata.get(ROUND_FIELD)
    if type(claimed_round) is not int or claimed_round != task.round:
        shown = str(claimed_round) if type(claimed_round) is int else "no round"
        raise PayloadError(f"{sender}: the reply is for round {shown}, not round {task.round}", rule="round")
    if not task.nonce or not secrets.compare_digest(str(metadata.get(NONCE_FIELD, "")), task.nonce):
        raise PayloadError(f"{sender}: the reply does not carry this message's nonce (a replayed reply?)", rule="nonce")


def check_examples(metadata: Mapping[str, Any], *, sender: str, known: int) -> int:
    """The reported training example count: an integer in ``1..known`` (the client's training rows)."""
    examples = metadata.get(EXAMPLES_KEY)
    if type(examples) is not int:
        raise PayloadError(f"{sender}: reports no integer {EXAMPLES_KEY!r}", rule="examples")
    if not 1 <= examples <= known:
        raise PayloadError(
            f"{sender}: reports {examples} training examples; its partition has {known}", rule="examples"
        )
    return examples


def check_reply(reply: Payload, task: ClientTask, *, known_examples: int, max_metadata_bytes: int) -> ClientInfo:
    """Every runtime-level check of a decoded reply, in order; the client as the aggregate may weigh it.

    The size was checked before decoding (:func:`check_size`); the algorithm checks the tensors after this.
    """
    check_metadata(reply.metadata, sender=task.client_id, limit=max_metadata_bytes)
    check_binding(reply.metadata, task)
    if not task.train:
        return ClientInfo(task.client_id, known_examples)
    examples = check_examples(reply.metadata, sender=task.client_id, known=known_examples)
    return ClientInfo(task.client_id, examples)

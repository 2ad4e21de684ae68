"""fedexperts payloads and client tasks as Flower records, and the bytes a message carries.

Tensors travel in an ``ArrayRecord`` (numpy ``.npy`` bytes, no pickle) under the model's own
parameter names. numpy has no bfloat16, so bfloat16 tensors are sent as float32 (exact) and
the receiver restores each tensor's original dtype from the ``dtypes`` map; nothing is ever
averaged as raw bit patterns. The metadata and the task ride in a ``ConfigRecord`` as JSON
strings. Bytes are counted as Flower's own ``message_size_mod`` counts them: the sum of
``count_bytes()`` over the message's records.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedexperts.federation.client import ClientTask
from fedexperts.federation.payload import cast_for_transfer, restore_dtypes
from fedexperts.federation.replies import check_metadata_text
from fedexperts.interface import Payload, PayloadError

ARRAYS, CONFIG = "arrays", "config"
_METADATA, _DTYPES, _TASK, _COMMIT, _RUN = "metadata", "dtypes", "task", "commit-round", "run-uid"
_UNSUPPORTED = {torch.bfloat16: torch.float32}
"""Dtypes numpy cannot hold, and the exact wider dtype they travel as."""


def payload_to_record(
    payload: Payload,
    *,
    task: ClientTask | None = None,
    commit_round: int | None = None,
    run_uid: str | None = None,
    dtype: torch.dtype | None = None,
) -> RecordDict:
    """A message body: the tensors, their original dtypes where changed, metadata and (downlink) the task.

    ``dtype`` (float16 only: numpy has no bfloat16) casts floating tensors for transfer.
    """
    if dtype is not None and dtype in _UNSUPPORTED:
        raise PayloadError(f"Flower records cannot carry {dtype}; use float16 for a half-precision transfer")
    tensors, dtypes = cast_for_transfer(payload.tensors, dtype, widen=_UNSUPPORTED)
    config: dict[str, Any] = {
        _METADATA: json.dumps(payload.metadata, sort_keys=True, allow_nan=False),
        _DTYPES: json.dumps(dtypes, sort_keys=True),
    }
    if task is not None:
        config[_TASK] = json.dumps(asdict(task), sort_keys=True)
    if commit_round is not None:
        config[_COMMIT] = commit_round
    if run_uid is not None:
        config[_RUN] = run_uid
    return RecordDict({ARRAYS: ArrayRecord(tensors), CONFIG: ConfigRecord(config)})


def record_to_payload(content: RecordDict, *, sender: str, max_metadata_bytes: int | None = None) -> Payload:
    """The payload a record carries, each tensor back in its original dtype; malformed input is a PayloadError.

    With ``max_metadata_bytes`` (a server reading a reply) the metadata and dtype map are length-checked before
    they are parsed, and the arrays become tensors only after both parsed.
    """
    try:
        arrays = content[ARRAYS]
        config = content[CONFIG]
        if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
            raise TypeError(f"expected {ARRAYS!r} as ArrayRecord and {CONFIG!r} as ConfigRecord")
        texts = str(config[_METADATA]), str(config[_DTYPES])
        if max_metadata_bytes is not None:
            for text in texts:
                check_metadata_text(text, sender=sender, limit=max_metadata_bytes)
        metadata, dtypes = (json.loads(text) for text in texts)
        if not isinstance(metadata, dict) or not isinstance(dtypes, dict):
            raise TypeError("metadata and dtypes must be JSON objects")
        tensors = dict(arrays.to_torch_state_dict())
        restore_dtypes(tensors, dtypes)
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        raise PayloadError(f"{sender}: not a fedexperts message ({str(error)[:200]})", rule="metadata") from error
    return Payload(tensors, metadata)


class Downlink(NamedTuple):
    """What a downlink asks of a node, besides its tensors."""

    task: ClientTask
    commit_round: int
    """The round whose staged personal state the client may now commit (0: none)."""
    run_uid: str
    """The fedexperts run (its run directory's id) the node keeps this client's personal state under."""


def task_of(content: RecordDict) -> Downlink:
    """The task a downlink carries, the round the client may commit and the run it belongs to."""
    try:
        config = content[CONFIG]
        fields = json.loads(str(config[_TASK]))
        run_uid = str(config[_RUN])
        if not run_uid.isalnum():
            raise ValueError(f"{_RUN} {run_uid!r} is not an id")
        return Downlink(ClientTask(**fields), int(config.get(_COMMIT, 0)), run_uid)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as error:
        raise PayloadError(f"not a fedexperts task ({error})") from error


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message body as Flower's ``message_size_mod`` counts them."""
    return sum(record.count_bytes() for record in content.values())

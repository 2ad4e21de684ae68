"""Batched clients: k clients' local training as one forward and backward through the shared frozen base.

:mod:`~fedexperts.batching.groups` runs each client's rows through its own trainable tensors,
:mod:`~fedexperts.batching.train` is the training loop, :mod:`~fedexperts.batching.support` says when
a setting cannot batch. The in-process runtime uses them for ``federation.parallel_clients``
(:mod:`fedexperts.federation.batched`).
"""

from fedexperts.batching.groups import (
    BatchingError,
    ClientRandom,
    RowGroups,
    concatenate,
    grouped_forwards,
    stack_clients,
)
from fedexperts.batching.support import batching_refusal
from fedexperts.batching.train import BatchMember, client_copies, train_batched

__all__ = [
    "BatchMember",
    "BatchingError",
    "ClientRandom",
    "RowGroups",
    "batching_refusal",
    "client_copies",
    "concatenate",
    "grouped_forwards",
    "stack_clients",
    "train_batched",
]

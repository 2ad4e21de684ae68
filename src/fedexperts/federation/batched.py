"""In-process client steps k at a time: set up and evaluate each, train them as one batch, then reply for each.

Setup and evaluation run client by client on the shared base (each loads its tensors into it);
each client's trainable tensors are then copied out (:func:`~fedexperts.batching.client_copies`)
with its random stream, all train together (:func:`~fedexperts.batching.train_batched`), and each
client's trained tensors are loaded back into the base, its stream restored, before its uplink and
personal state are read, so the algorithm sees what it sees after a client trained alone. Time and
peak memory are the batch's: each client reports its share of the batch's training time and the
batch's peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedexperts.batching import BatchMember, ClientRandom, client_copies, train_batched
from fedexperts.evaluation import pad_token_id
from fedexperts.experiment import Setting
from fedexperts.federation.accounting import peak_memory
from fedexperts.federation.client import ClientStep, ClientTask, begin_client, finish_client, training_batches
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload
from fedexperts.training import TrainResult, trainable_by_name


def run_clients_batched(
    setting: Setting, store: ClientStateStore, tasks: Sequence[tuple[ClientTask, Payload]]
) -> list[Payload | Exception]:
    """Each task's reply, or the error it failed with, in order (a failing client does not stop the others)."""
    outcomes: dict[int, Payload | Exception] = {}
    steps: dict[int, ClientStep] = {}
    members: dict[int, BatchMember] = {}
    config = setting.config
    with peak_memory(setting.device) as peak:
        for index, (task, received) in enumerate(tasks):
            try:
                step = begin_client(setting, store, task, received)
            except Exception as error:
                outcomes[index] = error
                continue
            steps[index] = step
            if step.trains:
                members[index] = BatchMember(
                    step.client.client_id,
                    client_copies(trainable_by_name(step.context.model)),
                    training_batches(setting, step.client, task.round),
                    ClientRandom.capture(setting.device),
                    setting.algorithm.proximal_term(step.context),
                )
        results: dict[int, TrainResult | Exception] = {}
        if members:
            trained = train_batched(
                setting.model,
                list(members.values()),
                config.train,
                pad_token_id=pad_token_id(setting.tokenizer),
                total_rounds=config.federation.rounds,
                round_index=tasks[0][0].round - 1,
            )
            results = dict(zip(members, trained, strict=True))
    for index, step in steps.items():
        result = results.get(index)
        if isinstance(result, Exception):
            outcomes[index] = result
            continue
        try:
            if result is not None:
                _load_back(step, members[index])
                step.watch.seconds["train"] = result.seconds
            outcomes[index] = finish_client(setting, store, step, [result] if result is not None else [], peak.bytes)
        except Exception as error:
            outcomes[index] = error
    return [outcomes[index] for index in range(len(tasks))]  # every task began (or failed to) and finished


@torch.no_grad()
def _load_back(step: ClientStep, member: BatchMember) -> None:
    """The client's trained tensors into the shared model, and its random stream, as after training alone."""
    for name, param in trainable_by_name(step.context.model).items():
        param.copy_(member.tensors[name])
    member.random.restore(next(iter(member.tensors.values())).device)

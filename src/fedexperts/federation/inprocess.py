"""The single-process runtime: sampled clients run one after another on one loaded base model.

Every message is really encoded and decoded (safetensors bytes), so the byte counts are exact
and the server validates what it would receive over a network. The server loop (sampling,
validation, aggregation, records, checkpoints, resume) is :class:`~fedexperts.federation.server.Federation`;
this module is its in-process transport, which calls the client step directly and keeps every
client's personal state in the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedexperts.batching import batching_refusal
from fedexperts.config import ExperimentConfig
from fedexperts.experiment import Setting, build_setting
from fedexperts.federation.batched import run_clients_batched
from fedexperts.federation.client import ClientTask, run_client
from fedexperts.federation.payload import decode, encode, transfer_dtype
from fedexperts.federation.resume import check_resume
from fedexperts.federation.rundir import RunResult, discard_unstarted, prepare_run_dir
from fedexperts.federation.runstore import CLIENTS, RunStore
from fedexperts.federation.server import Delivery, Federation, Member
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload, majority_category

logger = logging.getLogger(__name__)


def members_of(setting: Setting) -> dict[str, Member]:
    """The server's view of a setting's clients (in-process, the server may read it directly)."""
    return {
        client.client_id: Member(
            client.client_id, client.num_examples, majority_category(client.categories) or client.client_id
        )
        for client in setting.clients
    }


@dataclass(frozen=True)
class ClientEvent:
    """A client of one exchange (a round's, or the final evaluation's) starting or, with its delivery, finished."""

    task: ClientTask
    position: int
    """1-based, among the exchange's ``total`` clients (they run one after another)."""
    total: int
    delivery: Delivery | None = None
    """``None`` when the client is starting."""


class InProcessTransport:
    """Runs each task by calling the client step in this process; personal states live under ``run_dir/clients``.

    With ``federation.parallel_clients = k`` the tasks run k at a time as one batched step (when the
    setting can batch; else one at a time, said once in the log).

    ``on_client`` hears of every client starting and finishing (progress displays).
    """

    def __init__(
        self, setting: Setting, store: ClientStateStore, on_client: Callable[[ClientEvent], None] | None = None
    ) -> None:
        self.setting = setting
        self.store = store
        self.dtype = transfer_dtype(setting.config.federation.transfer_dtype)
        self.on_client = on_client or (lambda event: None)
        self.parallel = setting.config.federation.parallel_clients
        if self.parallel > 1:
            refusal = batching_refusal(setting.algorithm, setting.model, setting.config.train)
            if refusal is not None:
                logger.warning("federation.parallel_clients=%d: clients run one at a time: %s", self.parallel, refusal)
                self.parallel = 1

    def exchange(self, tasks: Sequence[tuple[ClientTask, Payload]]) -> dict[str, Delivery]:
        deliveries: dict[str, Delivery] = {}
        for first in range(0, len(tasks), self.parallel):
            chunk = tasks[first : first + self.parallel]
            for position, (task, _) in enumerate(chunk, start=first + 1):
                self.on_client(ClientEvent(task, position, len(tasks)))
            done = [self._one(*chunk[0])] if len(chunk) == 1 else self._batch(chunk)
            for position, ((task, _), delivery) in enumerate(zip(chunk, done, strict=True), start=first + 1):
                deliveries[task.client_id] = delivery
                self.on_client(ClientEvent(task, position, len(tasks), delivery))
        return deliveries

    def _batch(self, chunk: Sequence[tuple[ClientTask, Payload]]) -> list[Delivery]:
        """Several client steps as one batch (:mod:`fedexperts.federation.batched`); each message encoded as alone."""
        started = time.perf_counter()
        downs = [encode(downlink, dtype=self.dtype) for _, downlink in chunk]
        outcomes = run_clients_batched(
            self.setting, self.store, [(task, decode(down)) for (task, _), down in zip(chunk, downs, strict=True)]
        )
        seconds = (time.perf_counter() - started) / len(chunk)
        return [self._delivery(down, outcome, seconds) for down, outcome in zip(downs, outcomes, strict=True)]

    def _one(self, task: ClientTask, downlink: Payload) -> Delivery:
        started = time.perf_counter()
        down = encode(downlink, dtype=self.dtype)
        outcome: Payload | Exception
        try:
            outcome = run_client(self.setting, self.store, task, decode(down))
        except Exception as error:  # a client that raises is recorded; the round goes on without it
            outcome = error
        return self._delivery(down, outcome, time.perf_counter() - started)

    def _delivery(self, down: bytes, outcome: Payload | Exception, seconds: float) -> Delivery:
        """What the server hears of one client step: its encoded reply, or the error it (or its encoding) raised."""
        if not isinstance(outcome, Exception):
            try:
                up = encode(outcome, dtype=self.dtype)
            except Exception as error:
                outcome = error
            else:
                return Delivery(len(down), len(up), decode(up), seconds=seconds)
        return Delivery(len(down), error=f"{type(outcome).__name__}: {outcome}", seconds=seconds)

    def reject(self, task: ClientTask) -> None:
        self.store.unstage(task.round, task.client_id)

    def staged(self, round_number: int) -> dict[Path, Path]:
        return self.store.staged(round_number)

    def commit(self, round_number: int, accepted: Sequence[str]) -> None:
        self.store.commit(round_number)

    def resume(self, done: int) -> None:
        self.finish_commit(self.store, done)

    @staticmethod
    def finish_commit(store: ClientStateStore, done: int) -> None:
        """Move what round ``done`` staged into place (its commit may have been cut short); drop later work."""
        if done:
            store.commit(done)
        store.discard_staged(after=done)


def run_experiment(
    config: ExperimentConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resume_from: int | None = None,
    setting: Setting | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_client: Callable[[ClientEvent], None] | None = None,
) -> RunResult:
    """Run (or resume) ``config`` in this process and write the run directory.

    ``resume_from`` (implies ``resume``) continues after that earlier completed round. A start that
    fails before completing a round leaves no run directory behind (:func:`discard_unstarted`).
    ``on_round`` gets each round's record when the round is checkpointed; ``on_client`` each client
    starting and finishing (rounds and the final evaluation).
    """
    target = run_dir or config.output_dir / config.name
    resume = resume or resume_from is not None
    prepare_run_dir(config, target, resume=resume, overwrite=overwrite)
    store = ClientStateStore(target / CLIENTS)
    try:
        if resume:  # a damaged run is reported before the model loads (the server loop checks again)
            files = RunStore(target)
            InProcessTransport.finish_commit(store, files.rounds_done)
            check_resume(files, resume_from)
        setting = setting or build_setting(config)
        federation = Federation(
            config,
            target,
            algorithm=setting.algorithm,
            model=setting.model,
            members=members_of(setting),
            transport=InProcessTransport(setting, store, on_client),
            on_round=on_round,
        )
        return RunResult(target, federation.run(resume_from=resume_from))
    except BaseException:
        discard_unstarted(target)
        raise

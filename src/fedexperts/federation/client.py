"""The client step both runtimes call: build the client's model, evaluate, train, keep state, reply.

A step is a pure function of (config, client, round, received tensors, the client's committed
state): the random seed is derived from ``(federation.seed, round, client)``, so the in-process
runtime, a resumed run and a Flower ClientApp all compute the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedexperts.data.tokenize import InstructionCollator
from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import Scores, instruction_scores, mmlu_scores, multiple_choice_accuracy, pad_token_id
from fedexperts.experiment import ClientData, Setting, derived_seed
from fedexperts.federation.accounting import Stopwatch, held_bytes, peak_memory
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import ClientContext, ClientInfo, LocalData, Payload
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.routing import RoutingRecorder
from fedexperts.training import TrainResult, train_local


@dataclass(frozen=True)
class ClientTask:
    client_id: str
    round: int
    """1-based round; the final evaluation uses ``rounds + 1``."""
    train: bool = True
    evaluate: bool = True
    """Score the client's model on its own test split before it trains (reported, never decided on)."""
    validate: bool = False
    """Score it on its validation split before it trains (what the algorithm's decisions read)."""
    union: bool = False
    """Also score it on the union test set (final evaluation)."""
    probes: bool = False
    """Also score knowledge probes, and MMLU with ``eval.mmlu`` (final evaluation)."""
    nonce: str = ""
    """Issued by the server for this one message; the reply echoes it (:mod:`fedexperts.federation.replies`)."""
    max_reply_bytes: int | None = None
    """The most bytes the server accepts back (its plan's bound); ``None``: a client step run outside a round."""


CLIENT_FIELD, ROUND_FIELD, NONCE_FIELD = "reply_client", "reply_round", "reply_nonce"
"""Reply metadata: what the client echoes of the task it ran, binding its reply to that one message."""


def binding(task: ClientTask) -> dict[str, Any]:
    """What a client's reply to ``task`` echoes (the server compares it with the task it sent)."""
    return {CLIENT_FIELD: task.client_id, ROUND_FIELD: task.round, NONCE_FIELD: task.nonce}


def shuffled_batches(
    rows: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches over ``rows``, reshuffled every epoch by a generator seeded with ``seed``."""
    collate = InstructionCollator(pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([rows[index] for index in order[start : start + batch_size]])


def row_batches(
    rows: Sequence[Mapping[str, Any]], pad_token_id: int, batch_size: int = 8
) -> Iterator[dict[str, torch.Tensor]]:
    """Token rows in their stored order, batched (calibration, measurements, analysis)."""
    collate = InstructionCollator(pad_token_id)
    for start in range(0, len(rows), batch_size):
        yield collate([dict(row) for row in rows[start : start + batch_size]])


def _scores(prefix: str, scores: Scores) -> dict[str, float | int]:
    return {f"{prefix}_{key}": value for key, value in scores.as_dict().items()}


def start_client(
    setting: Setting, store: ClientStateStore, index: int, received: Payload, data: LocalData
) -> ClientContext:
    """The client's model for this step (``context.model``), as every client step builds it.

    The setting's model for this downlink (the shared base or the client's own sub-MoE), the seed of
    ``(federation.seed, round, client index)``, and the algorithm's setup from the received tensors and
    the client's committed state. ``fedexperts export`` builds a run's client model through here too.
    """
    client_model = setting.client_model(received)  # the shared base, or this client's own sub-MoE
    torch.manual_seed(derived_seed(setting.config.federation.seed, data.round, index))  # after any LoRA init
    return setting.algorithm.setup_client(client_model, received, store.load(data.client.client_id), data)


@dataclass
class ClientStep:
    """One client step between its setup and evaluation (:func:`begin_client`) and its reply (:func:`finish_client`).

    Local training runs in between: alone (:func:`train_client`), or as one row group of a batch of
    clients (:mod:`fedexperts.federation.batched`).
    """

    task: ClientTask
    client: ClientData
    context: ClientContext
    metrics: dict[str, Any]
    watch: Stopwatch

    @property
    def trains(self) -> bool:
        """Whether this step runs local training (a client sitting the round out does not)."""
        return self.task.train and not self.context.idle


def begin_client(setting: Setting, store: ClientStateStore, task: ClientTask, received: Payload) -> ClientStep:
    """Build the client's model for ``task`` (:func:`start_client`) and run the evaluations it asks for."""
    config = setting.config
    client = setting.client(task.client_id)
    info = ClientInfo(client.client_id, client.num_examples)
    tokenizer = setting.tokenizer
    pad = pad_token_id(tokenizer)
    watch = Stopwatch()
    metrics: dict[str, Any] = {"examples": client.num_examples}
    local = LocalData(info, lambda: row_batches(client.train, pad), task.round, client.categories)
    context = start_client(setting, store, client.index, received, local)
    model = context.model
    if not context.idle:  # a client sitting the round out holds no model of its own
        metrics["model_bytes"] = held_bytes(model)
    evaluate_options: dict[str, Any] = {
        "max_new_tokens": config.eval.max_new_tokens,
        "batch_size": config.eval.batch_size,
        "add_special_tokens": setting.template.add_special_tokens,
        "rouge_stemmer": config.eval.rouge_stemmer,
        "rouge_tokenizer": config.eval.rouge_tokenizer,
    }
    with watch.phase("eval"):
        if task.validate and client.validation is not None and not context.idle:
            metrics.update(_scores("val", instruction_scores(model, tokenizer, client.validation, **evaluate_options)))
        if task.evaluate and not context.idle:
            metrics.update(_scores("eval", instruction_scores(model, tokenizer, client.test, **evaluate_options)))
        if task.union and setting.union is not None:
            metrics.update(_scores("union", instruction_scores(model, tokenizer, setting.union, **evaluate_options)))
        if task.probes and setting.probes:
            metrics["probes"] = multiple_choice_accuracy(model, tokenizer, setting.probes)
        if task.probes and setting.mmlu:
            mmlu = mmlu_scores(model, tokenizer, setting.mmlu, batch_size=config.eval.batch_size)
            metrics["mmlu"] = mmlu.model_dump()
    return ClientStep(task, client, context, metrics, watch)


def training_batches(setting: Setting, client: ClientData, round_number: int) -> Iterator[dict[str, torch.Tensor]]:
    """A client's endless training batches of a round, shuffled by the seed of (federation.seed, round, client, 1)."""
    config = setting.config
    seed = derived_seed(config.federation.seed, round_number, client.index, 1)
    return shuffled_batches(client.train, config.train.batch_size, pad_token_id(setting.tokenizer), seed)


def train_client(setting: Setting, step: ClientStep) -> list[TrainResult]:
    """Local training of one client alone: each of the algorithm's training phases over the step's batches."""
    config, algorithm, context = setting.config, setting.algorithm, step.context
    recorder = RoutingRecorder(unwrap_model(context.model)) if algorithm.counts_routing else None
    with step.watch.phase("train"):
        batches = training_batches(setting, step.client, step.task.round)
        results = []
        for phase in algorithm.training_phases(context):  # one, unless the algorithm trains in turns
            with phase:
                results.append(
                    train_local(
                        context.model,
                        batches,
                        config.train,
                        total_rounds=config.federation.rounds,
                        round_index=step.task.round - 1,
                        proximal=algorithm.proximal_term(context),
                        routing=recorder,
                        description=step.client.client_id,
                    )
                )
    if recorder is not None:
        context.routed_tokens = {name: counts.tolist() for name, counts in recorder.counts().items()}
    return results


def finish_client(
    setting: Setting, store: ClientStateStore, step: ClientStep, results: Sequence[TrainResult], peak_bytes: int
) -> Payload:
    """The step's reply: its uplink (after training) and metrics; the new personal state is staged under its round."""
    algorithm, context, metrics = setting.algorithm, step.context, step.metrics
    uplink = Payload({})
    if step.task.train and context.idle:
        uplink = algorithm.uplink(context)  # the algorithm's reply that the client sat the round out
    elif step.task.train:
        if not results:
            raise FedExpertsError(f"{algorithm.name}: no training phase for {step.client.client_id}")
        # the loss of the last phase, whose result is sent; the tokens of every phase
        metrics.update({"train_loss": results[-1].loss, "train_tokens": sum(r.tokens for r in results)})
        uplink = algorithm.uplink(context)
        personal = algorithm.personal_state(context)
        if personal is not None:
            store.stage(step.task.round, step.client.client_id, personal)
    metrics.update({f"seconds_{name}": value for name, value in step.watch.seconds.items()})
    metrics["peak_memory_bytes"] = peak_bytes
    return Payload(uplink.tensors, {**uplink.metadata, **metrics, **binding(step.task)})


def run_client(setting: Setting, store: ClientStateStore, task: ClientTask, received: Payload) -> Payload:
    """Run one client task on the model the setting gives it; the reply carries the uplink and the metrics.

    The model is the shared base, or (``federation.client_model = "sub-moe"``, Flower nodes) the
    sub-MoE the algorithm names for this downlink, loaded from the checkpoint for this step only.

    The new personal state is staged under ``task.round``; the runtime commits it once the round
    is checkpointed.
    """
    with peak_memory(setting.device) as peak:
        step = begin_client(setting, store, task, received)
        results = train_client(setting, step) if step.trains else []
    return finish_client(setting, store, step, results, peak.bytes)

"""The server's side of a run, whatever carries the messages: sampling, validation, aggregation, records.

A :class:`Federation` plans each round, hands every sampled client's downlink to a
:class:`Transport` (the in-process runtime calls the client step directly; Flower sends
messages to SuperNodes), validates what comes back, aggregates, and makes the round durable
through :class:`~fedexperts.federation.runstore.RunStore` (record and checkpoint, then the
manifest's commit, then the transport's commit of the clients' personal states). ``run`` first
verifies everything a continuation depends on (:mod:`fedexperts.federation.resume`) and redoes the
unfinished round with the same seeds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from fedexperts.config import ExperimentConfig, round_size
from fedexperts.errors import RunError
from fedexperts.experiment import client_ids
from fedexperts.federation.client import ClientTask
from fedexperts.federation.replies import check_reply, check_size, new_nonce, reply_byte_limit
from fedexperts.federation.resume import check_resume
from fedexperts.federation.runstore import RunStore
from fedexperts.interface import (
    REPORT_KEY,
    Algorithm,
    ClientInfo,
    ClientUpdate,
    Payload,
    PayloadError,
    State,
    check_metadata_numbers,
)
from fedexperts.moe.families import model_note
from fedexperts.moe.params import Role
from fedexperts.reporting import schema

_GLOBAL, _SERVER, _SERVER_METADATA = "global/", "server/", "server"


def restore_checkpoint(checkpoint: Payload, algorithm: Algorithm) -> State:
    """Load a checkpoint's server state into ``algorithm`` and return its global state."""
    server = {k[len(_SERVER) :]: v for k, v in checkpoint.tensors.items() if k.startswith(_SERVER)}
    algorithm.load_server_state(Payload(server, checkpoint.metadata.get(_SERVER_METADATA, {})))
    return {k[len(_GLOBAL) :]: v for k, v in checkpoint.tensors.items() if k.startswith(_GLOBAL)}


def sample_clients(
    ids: Sequence[str],
    *,
    fraction: float,
    minimum: int,
    seed: int,
    round_number: int,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """The round's clients: ``max(minimum, ceil(fraction * N))`` drawn without replacement, seeded per round.

    With ``groups`` (each client's majority category), sampling is *enforced-different* as in
    FedMoE's study: clients are drawn in a seeded random order, each taken only if its group is not
    yet in the round, until the count is reached or every group is in; the rest are then drawn
    from the remaining clients in the same order.
    """
    count = round_size(len(ids), fraction, minimum)
    order = [int(i) for i in np.random.default_rng([seed, round_number]).permutation(len(ids))]
    if groups is None:
        chosen = order[:count]
    else:
        chosen, seen = [], set()
        for index in order:
            if len(chosen) < count and groups[index] not in seen:
                chosen.append(index)
                seen.add(groups[index])
        chosen += [index for index in order if index not in chosen][: count - len(chosen)]
    return [ids[index] for index in sorted(chosen)]


@dataclass(frozen=True)
class Member:
    """What the server knows of a client: its example count and the group distinct sampling uses."""

    client_id: str
    num_examples: int
    group: str
    """The client's majority category (its id when its data has none)."""


@dataclass(frozen=True)
class Delivery:
    """One client's exchange as the server saw it: exact bytes each way and the decoded reply, or why none."""

    bytes_down: int
    bytes_up: int = 0
    reply: Payload | None = None
    error: str | None = None
    seconds: float = 0.0
    refused: str | None = None
    """The rule of :mod:`~fedexperts.federation.replies` that refused the reply before it was decoded (size)."""


class Transport(Protocol):
    """How downlinks reach clients and replies come back; also where clients' personal state is committed."""

    def exchange(self, tasks: Sequence[tuple[ClientTask, Payload]]) -> dict[str, Delivery]:
        """Run every task (a client never raises through here: failures come back as ``Delivery.error``)."""
        ...

    def reject(self, task: ClientTask) -> None:
        """The client's update was refused: its staged personal state must not become current."""
        ...

    def staged(self, round_number: int) -> Mapping[Path, Path]:
        """The personal states :meth:`commit` will put in place on this machine: final path -> staged path.

        They are listed (with their digests) in the run's manifest before they move, so only files
        inside the run directory belong here; states kept elsewhere (on SuperNodes) are not.
        """
        ...

    def commit(self, round_number: int, accepted: Sequence[str]) -> None:
        """The round is committed: the accepted clients' staged personal states become current."""
        ...

    def resume(self, done: int) -> None:
        """Restarting after round ``done``: finish its commit and drop anything staged later."""
        ...


def _eval_record(metadata: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """A reply's ``{prefix}_loss``, ``{prefix}_rouge_l``... as the fields of a ``Scores`` (validated with the entry).

    Every field of ``Scores`` the reply carries is copied; the optional ones a client did not send stay absent.
    """
    if f"{prefix}_loss" not in metadata:
        return None
    return {key: metadata[f"{prefix}_{key}"] for key in schema.Scores.model_fields if f"{prefix}_{key}" in metadata}


class Federation:
    """The server loop of one run; see the module docstring for the on-disk protocol."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path,
        *,
        algorithm: Algorithm,
        model: nn.Module,
        members: Mapping[str, Member],
        transport: Transport,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.algorithm = algorithm
        self.model = model
        self.ids = client_ids(config.federation.clients)
        missing = sorted(set(self.ids) - set(members))
        if missing:
            raise RunError(f"the federation has no member for {', '.join(missing)}")
        self.members = dict(members)
        self.transport = transport
        self.store = RunStore(run_dir)
        self.on_round = on_round or (lambda record: None)

    def _run_record(self) -> schema.RunInfo:
        roles = self.algorithm.roles
        params = dict(self.model.named_parameters())
        by_role = {role: sum(params[name].numel() for name, r in roles.items() if r is role) for role in Role}
        record = {
            "kind": "run",
            "name": self.config.name,
            "algorithm": str(self.config.algorithm.name),
            "seed": self.config.federation.seed,
            "clients": self.ids,
            "rounds": self.config.federation.rounds,
            "model": self.config.model.name,
            "model_note": model_note(self.model),
            "parameters": {
                "total": sum(p.numel() for p in params.values()),
                "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
                "shared": by_role[Role.SHARED],
                "personal": by_role[Role.PERSONAL],
                "frozen": by_role[Role.FROZEN],
            },
            "groups": {cid: self.members[cid].group for cid in self.ids},
        }
        return schema.RunInfo.model_validate(record)

    # -- state -----------------------------------------------------------------------------------------
    def _restore(self, resume_from: int | None) -> tuple[int, State]:
        """Verify the run directory, then the round to continue after and the global state after it."""
        self.transport.resume(self.store.rounds_done)  # finish the last commit's moves first: they are listed
        done = check_resume(self.store, resume_from)
        self.store.drop_pending()
        if resume_from is not None:  # continue after an earlier point: later rounds and the final record go
            self.store.roll_back(done)
        if done == 0:
            return 0, self.algorithm.initial_global_state(self.model)
        return done, restore_checkpoint(self.store.checkpoints.load(done), self.algorithm)

    def _checkpoint(self, global_state: State) -> Payload:
        server = self.algorithm.server_state()
        tensors = {_GLOBAL + k: v for k, v in global_state.items()}
        tensors.update({_SERVER + k: v for k, v in server.tensors.items()})
        return Payload(tensors, {_SERVER_METADATA: server.metadata})

    # -- clients ---------------------------------------------------------------------------------------
    def _exchange(
        self, tasks: Sequence[ClientTask], global_state: State
    ) -> tuple[dict[str, schema.ClientRound], list[ClientUpdate]]:
        """Send, run, receive and validate; every failure or refusal is recorded, never raised.

        Each message gets its own nonce and the round's reply-size bound (:mod:`~fedexperts.federation.replies`).
        """
        limit = reply_byte_limit(global_state, self.config.federation.max_reply_metadata_bytes)
        tasks = [dataclasses.replace(task, nonce=new_nonce(), max_reply_bytes=limit) for task in tasks]
        downlinks = []
        for task in tasks:
            member = self.members[task.client_id]
            downlinks.append(
                (task, self.algorithm.downlink(global_state, ClientInfo(task.client_id, member.num_examples)))
            )
        deliveries = self.transport.exchange(downlinks)
        entries, updates = {}, []
        for task in tasks:
            entry, update = self._check(task, deliveries[task.client_id], global_state)
            entries[task.client_id] = entry
            if update is not None:
                updates.append(update)
        return entries, updates

    def _info(self, client_id: str) -> ClientInfo:
        return ClientInfo(client_id, self.members[client_id].num_examples)

    def _check(
        self, task: ClientTask, delivery: Delivery, global_state: State
    ) -> tuple[schema.ClientRound, ClientUpdate | None]:
        member = self.members[task.client_id]
        entry: dict[str, Any] = {
            "status": "ok",
            "error": None,
            "examples": member.num_examples,
            "bytes_down": delivery.bytes_down,
            "bytes_up": delivery.bytes_up,
        }
        reply = delivery.reply
        if reply is None:
            self.transport.reject(task)
            status = "failed" if delivery.refused is None else "rejected"
            return _unanswered(entry, status, delivery.error or "no reply", delivery, delivery.refused), None
        try:
            check_size(delivery.bytes_up, task)
            info = check_reply(
                reply,
                task,
                known_examples=member.num_examples,
                max_metadata_bytes=self.config.federation.max_reply_metadata_bytes,
            )
        except PayloadError as error:
            self.transport.reject(task)
            return _unanswered(entry, "rejected", str(error), delivery, error.rule), None
        metadata = reply.metadata
        entry.update(
            train_loss=metadata.get("train_loss"),
            eval=_eval_record(metadata, "eval"),
            validation=_eval_record(metadata, "val"),
            peak_memory_bytes=metadata.get("peak_memory_bytes", 0),
            seconds={
                "setup": metadata.get("seconds_setup", 0.0),
                "train": metadata.get("seconds_train", 0.0),
                "eval": metadata.get("seconds_eval", 0.0),
                "total": delivery.seconds,
            },
        )
        if "model_bytes" in metadata:  # absent, not null, from clients that predate it
            entry["model_bytes"] = metadata["model_bytes"]
        if isinstance(metadata.get(REPORT_KEY), dict):  # absent, not null, when the algorithm reports nothing
            entry["report"] = metadata[REPORT_KEY]
        if task.union or task.probes:
            entry.update(union=_eval_record(metadata, "union"), probes=metadata.get("probes"))
            if "mmlu" in metadata:  # absent, not null, in runs without eval.mmlu
                entry["mmlu"] = metadata["mmlu"]
        try:
            record = schema.validate(schema.ClientRound, entry)
        except schema.RecordError as error:
            self.transport.reject(task)
            message = f"{task.client_id}: reply metadata: {error}"
            return _unanswered(entry, "rejected", message, delivery, "metadata"), None
        if not task.train:
            return record, None
        try:
            check_metadata_numbers(metadata, sender=task.client_id)
            self.algorithm.check_update(reply, global_state, info)
        except PayloadError as error:
            self.transport.reject(task)
            return record.model_copy(update={"status": "rejected", "error": str(error), "refused": error.rule}), None
        return record, ClientUpdate(info, reply)

    # -- the run ---------------------------------------------------------------------------------------
    def run(self, *, resume_from: int | None = None) -> list[dict[str, Any]]:
        """Run (or continue, after verifying what it depends on) to the final evaluation; return the records.

        ``resume_from`` continues after that earlier completed round instead of the last one,
        dropping the later rounds' records and checkpoints.
        """
        federation = self.config.federation
        done, global_state = self._restore(resume_from)
        if not self.store.has_record("run"):
            self.store.write_record("run", self._run_record())
        for round_number in range(done + 1, federation.rounds + 1):
            global_state = self._round(round_number, global_state)
        if not self.store.has_record("final"):
            self.algorithm.finish()
            self._final(global_state)
        return self.store.write_metrics()

    def _round(self, round_number: int, global_state: State) -> State:
        federation = self.config.federation
        started = time.perf_counter()
        sampled = sample_clients(
            self.ids,
            fraction=federation.fraction,
            minimum=federation.min_clients,
            seed=federation.seed,
            round_number=round_number,
            groups=[self.members[cid].group for cid in self.ids] if federation.sampling == "distinct" else None,
        )
        every = self.config.eval.every
        evaluate = every > 0 and (round_number - 1) % every == 0
        validate = self.config.validation_fraction > 0
        tasks = [ClientTask(client_id, round_number, evaluate=evaluate, validate=validate) for client_id in sampled]
        entries, updates = self._exchange(tasks, global_state)
        if len(updates) < federation.min_successful:
            raise RunError(
                f"round {round_number}: {len(updates)} of {len(sampled)} clients succeeded, fewer than "
                f"federation.min_successful={federation.min_successful} ({_failure_summary(entries)})"
            )
        aggregate_start = time.perf_counter()
        before, global_state = global_state, self.algorithm.aggregate(global_state, updates)
        aggregate_seconds = time.perf_counter() - aggregate_start
        round_seconds = time.perf_counter() - started
        train = sum(e.seconds.train for e in entries.values())
        evaluation = sum(e.seconds.eval for e in entries.values())
        record = schema.RoundRecord(
            kind="round",
            round=round_number,
            sampled=tuple(sampled),
            clients=entries,
            bytes_down=sum(e.bytes_down for e in entries.values()),
            bytes_up=sum(e.bytes_up for e in entries.values()),
            seconds=schema.RoundSeconds(
                round=round_seconds,
                train=train,
                eval=evaluation,
                aggregate=aggregate_seconds,
                overhead=max(round_seconds - train - evaluation - aggregate_seconds, 0.0),
            ),
            **_privacy_field(self.algorithm.privacy_spent()),
        )
        staged = self.transport.staged(round_number)
        audit = self._audit(round_number, before, updates, global_state) if federation.audit else None
        retired = self.store.commit_round(round_number, record, self._checkpoint(global_state), staged, audit)
        self.transport.commit(round_number, [update.client.client_id for update in updates])
        self.store.delete(retired)
        self.store.write_metrics()
        self.on_round(schema.dump(record))
        return global_state

    @staticmethod
    def _audit(round_number: int, before: State, updates: Sequence[ClientUpdate], after: State) -> dict[str, Payload]:
        """The round's audit files: each accepted update as received, with its weight; the new global state;
        in round 1 also the initial one (so a server rule's steps can be replayed from the start)."""
        audit = {
            update.client.client_id: Payload(
                update.payload.tensors,
                {"examples": update.client.num_examples, "metadata": dict(update.payload.metadata)},
            )
            for update in updates
        }
        audit["global"] = Payload(dict(after))
        if round_number == 1:
            audit["initial"] = Payload(dict(before))
        return audit

    def _final(self, global_state: State) -> None:
        started = time.perf_counter()
        final_round = self.config.federation.rounds + 1
        tasks = [ClientTask(cid, final_round, train=False, evaluate=True, union=True, probes=True) for cid in self.ids]
        entries, _ = self._exchange(tasks, global_state)
        clients = {
            cid: schema.ClientFinal(
                status=e.status,
                error=e.error,
                own=e.eval,
                union=e.union,
                probes=e.probes,
                **({"mmlu": e.mmlu} if e.mmlu is not None else {}),
            )
            for cid, e in entries.items()
        }
        seconds = time.perf_counter() - started
        self.store.write_record("final", schema.FinalRecord(kind="final", clients=clients, seconds=seconds))


def _unanswered(
    entry: Mapping[str, Any], status: str, error: str, delivery: Delivery, refused: str | None = None
) -> schema.ClientRound:
    """The entry of a client with no usable reply: who it is and what was sent, without reported numbers.

    A refused reply's entry names the rule that refused it; nothing it reported is kept.
    """
    seconds = schema.ClientSeconds(train=0.0, eval=0.0, total=delivery.seconds)
    base = {key: entry[key] for key in ("examples", "bytes_down", "bytes_up")}
    fields = {**base, "status": status, "error": error, "seconds": seconds}
    if refused is not None:
        fields["refused"] = refused
    return schema.validate(schema.ClientRound, fields)


def _privacy_field(spent: Mapping[str, Any] | None) -> dict[str, schema.PrivacyRound]:
    """The round record's ``privacy`` field, absent (not null) in runs without differential privacy."""
    return {} if spent is None else {"privacy": schema.validate(schema.PrivacyRound, dict(spent))}


_SHOWN_FAILURES = 3
_FAILURE_CHARACTERS = 160


def _failure_summary(entries: Mapping[str, schema.ClientRound]) -> str:
    """The first few clients' failure reasons, each clipped: a one-line error stays one readable line."""
    failed = [(cid, " ".join((entry.error or "").split())) for cid, entry in entries.items() if entry.error]
    shown = [
        f"{cid}: {text if len(text) <= _FAILURE_CHARACTERS else text[: _FAILURE_CHARACTERS - 1] + '…'}"
        for cid, text in failed[:_SHOWN_FAILURES]
    ]
    if len(failed) > _SHOWN_FAILURES:
        shown.append(f"and {len(failed) - _SHOWN_FAILURES} more")
    return "; ".join(shown)

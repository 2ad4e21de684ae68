"""The Flower ServerApp: the fedexperts server loop with Flower's Grid as its transport.

The loop itself (sampling, per-client downlinks such as FedMoE's sub-MoE slices, validation of
every reply, partial and per-expert aggregation merged into the full global state, records and
checkpoints) is :class:`~fedexperts.federation.server.Federation`, the same as in-process; this
module only moves messages. Before the first round the server *queries* every connected SuperNode
for the client it serves (its ``partition-id``), its example count and majority category; the
server never sees client data. Before each round it queries nodes it has not seen, so a
SuperNode that restarts (with a new node id) rejoins. A client whose node is offline, replies
with an error or does not reply within ``federation.reply_timeout`` is recorded as failed and
the round goes on, down to ``federation.min_successful``.

A run is resumable (``resume=true`` in the run config, or ``resume=True`` here): the run directory
is ``output_dir/name`` by default, so a new ``flwr run`` of the same run name finds it, verifies it
as an in-process resume does, and continues after its last committed round with the same sampling
seeds. Nodes keep personal states under the run directory's own id (not Flower's run id), and each
task tells its node the last round in which that client's update was accepted and committed: the
node commits what it staged for that round and drops anything staged later, so work of a round the
server never committed (it died mid-round) is redone from the committed state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedexperts.config import ExperimentConfig
from fedexperts.errors import RunError
from fedexperts.experiment import build_setting, client_ids
from fedexperts.federation.client import ClientTask
from fedexperts.federation.flower.clientapp import MEMBER
from fedexperts.federation.flower.runconfig import config_from_run_config, run_control
from fedexperts.federation.flower.wire import payload_to_record, record_bytes, record_to_payload
from fedexperts.federation.payload import transfer_dtype
from fedexperts.federation.replies import check_size
from fedexperts.federation.rundir import RunResult, discard_unstarted, prepare_run_dir
from fedexperts.federation.runstore import RunStore
from fedexperts.federation.server import Delivery, Federation, Member
from fedexperts.interface import Payload, PayloadError

_POLL_SECONDS = 0.2


def _reason(message: Message) -> str:
    error = message.error
    reason = " ".join(str(error.reason).split())
    return f"Flower error {error.code}: {reason[-300:]}"


class FlowerTransport:
    """Sends each task to the SuperNode serving its client and collects the replies."""

    def __init__(self, grid: Grid, config: ExperimentConfig, run_dir: Path) -> None:
        self.grid = grid
        self.config = config
        self.store = RunStore(run_dir)
        """Read only: the round records a resume restores each client's last accepted round from."""
        self.run_uid = self.store.manifest.uid
        self.dtype = transfer_dtype(config.federation.transfer_dtype)
        if self.dtype is torch.bfloat16:
            raise RunError(
                "federation.transfer_dtype=bfloat16 cannot travel on Flower (numpy has no bfloat16); use float16"
            )
        self.ids = client_ids(config.federation.clients)
        self.node_of: dict[str, int] = {}
        self.members: dict[str, Member] = {}
        self._seen: set[int] = set()
        self._query_errors: dict[int, str] = {}
        self._accepted: dict[str, int] = {}

    # -- messages --------------------------------------------------------------------------------------
    def _send(self, messages: Sequence[Message], timeout: float) -> dict[str, tuple[Message, float]]:
        """Replies by the id of the message they answer, with seconds from sending to arrival."""
        started = time.perf_counter()
        pending = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        replies: dict[str, tuple[Message, float]] = {}
        while pending:
            for reply in self.grid.pull_messages(sorted(pending)):
                answered = reply.metadata.reply_to_message_id
                if answered in pending:
                    replies[answered] = (reply, time.perf_counter() - started)
                    pending.discard(answered)
            if not pending or time.perf_counter() - started > timeout:
                break
            time.sleep(_POLL_SECONDS)
        return replies

    # -- who serves whom -------------------------------------------------------------------------------
    def _query_new_nodes(self) -> None:
        online = set(self.grid.get_node_ids())
        new = sorted(online - self._seen)
        if not new:
            return
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in new]
        replies = self._send(queries, self.config.federation.reply_timeout)
        for query in queries:
            answered = replies.get(query.metadata.message_id)
            if answered is None or answered[0].has_error():  # asked again before the next round
                node = query.metadata.dst_node_id
                self._query_errors[node] = _reason(answered[0]) if answered is not None else "no reply"
                continue
            self._seen.add(query.metadata.dst_node_id)
            self._register(query.metadata.dst_node_id, answered[0], online)

    def _register(self, node: int, reply: Message, online: set[int]) -> None:
        record = reply.content.get(MEMBER)
        if not isinstance(record, ConfigRecord):
            raise RunError(f"SuperNode {node} did not answer the membership query with a {MEMBER!r} record")
        client_id = str(record["client-id"])
        if client_id not in self.ids:
            raise RunError(f"SuperNode {node} serves {client_id!r}, which is not one of this run's clients")
        previous = self.node_of.get(client_id)
        if previous is not None and previous != node and previous in online:
            raise RunError(
                f"SuperNodes {previous} and {node} both serve {client_id} (partition-id {record['partition-id']!s}); "
                "give each SuperNode its own partition-id"
            )
        self.node_of[client_id] = node
        self.members[client_id] = Member(client_id, int(str(record["examples"])), str(record["group"]))

    def discover(self) -> dict[str, Member]:
        """Wait (``federation.node_wait``) until every client's SuperNode has answered the membership query."""
        deadline = time.monotonic() + self.config.federation.node_wait
        while True:
            self._query_new_nodes()
            missing = [cid for cid in self.ids if cid not in self.members]
            if not missing:
                return dict(self.members)
            if time.monotonic() > deadline:
                raise RunError(
                    f"{len(self.members)} of {len(self.ids)} clients' SuperNodes answered within "
                    f"federation.node_wait={self.config.federation.node_wait:g} s; missing: {', '.join(missing)} "
                    "(start one SuperNode per partition-id 0..N-1)"
                    + "".join(f"; SuperNode {node}: {why}" for node, why in sorted(self._query_errors.items()))
                )
            time.sleep(1.0)

    # -- the Transport protocol ------------------------------------------------------------------------
    def exchange(self, tasks: Sequence[tuple[ClientTask, Payload]]) -> dict[str, Delivery]:
        self._query_new_nodes()
        online = set(self.grid.get_node_ids())
        deliveries: dict[str, Delivery] = {}
        sent: list[tuple[ClientTask, Message, int]] = []
        for task, downlink in tasks:
            node = self.node_of.get(task.client_id)
            if node is None or node not in online:
                deliveries[task.client_id] = Delivery(0, error=f"no SuperNode serving {task.client_id} is online")
                continue
            content = payload_to_record(
                downlink,
                task=task,
                commit_round=self._accepted.get(task.client_id, 0),
                run_uid=self.run_uid,
                dtype=self.dtype,
            )
            kind = MessageType.TRAIN if task.train else MessageType.EVALUATE
            sent.append((task, Message(content, dst_node_id=node, message_type=kind), record_bytes(content)))
        timeout = self.config.federation.reply_timeout
        replies = self._send([message for _task, message, _size in sent], timeout)
        for task, message, size in sent:
            answered = replies.get(message.metadata.message_id)
            if answered is None:
                deliveries[task.client_id] = Delivery(
                    size, error=f"no reply within federation.reply_timeout={timeout:g} s", seconds=timeout
                )
                continue
            reply, seconds = answered
            if reply.has_error():
                deliveries[task.client_id] = Delivery(size, error=_reason(reply), seconds=seconds)
                continue
            up = record_bytes(reply.content)
            try:  # the size and the metadata's length are checked before any array becomes a tensor
                check_size(up, task)
                limit = self.config.federation.max_reply_metadata_bytes
                payload = record_to_payload(reply.content, sender=task.client_id, max_metadata_bytes=limit)
            except PayloadError as error:
                deliveries[task.client_id] = Delivery(size, up, error=str(error), seconds=seconds, refused=error.rule)
                continue
            deliveries[task.client_id] = Delivery(size, up, payload, seconds=seconds)
        return deliveries

    def reject(self, task: ClientTask) -> None:
        """Nothing to send: the node drops what it staged when its next message names another round."""

    def staged(self, round_number: int) -> dict[Path, Path]:
        """None on this machine: personal states stay on the SuperNodes."""
        return {}

    def commit(self, round_number: int, accepted: Sequence[str]) -> None:
        for client_id in accepted:
            self._accepted[client_id] = round_number

    def resume(self, done: int) -> None:
        """Each client's last committed accepted round, from the round records (what its node may commit next)."""
        self._accepted = {}
        for round_number in range(1, done + 1):
            record = json.loads(self.store.record_path(f"round-{round_number:06d}").read_text())
            for client_id, entry in record["clients"].items():
                if entry["status"] == "ok":
                    self._accepted[client_id] = round_number


def run_on_grid(
    grid: Grid,
    config: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    discard_failed_start: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``config`` over the SuperNodes behind ``grid``; the run directory is written on this (server) machine.

    ``resume`` continues the run in ``run_dir`` after its last committed round (verified first). A
    run that fails before completing a round is removed (``discard_failed_start``; a simulation,
    whose nodes write into the run directory, does that itself once they have stopped).
    """
    from fedexperts.reporting import write_report

    prepare_run_dir(config, run_dir, resume=resume, overwrite=overwrite)
    try:
        setting = build_setting(config, only_clients=[], evaluation=False)
        transport = FlowerTransport(grid, config, run_dir)
        members = transport.discover()
        federation = Federation(
            config,
            run_dir,
            algorithm=setting.algorithm,
            model=setting.model,
            members=members,
            transport=transport,
            on_round=on_round,
        )
        records = federation.run()
    except BaseException:
        if discard_failed_start:
            discard_unstarted(run_dir)
        raise
    write_report(run_dir)
    return RunResult(run_dir, records)


def server_app(
    config: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    discard_failed_start: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp for ``config`` (default: the run config), writing to ``run_dir``.

    ``run_dir`` defaults to ``output_dir/name`` on the server machine; without ``config``, the run
    config's ``resume`` and ``overwrite`` keys (:data:`~.runconfig.RUN_CONTROL`) say what to do with a
    run already there.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            resolved = config_from_run_config(context.run_config)
            control = run_control(context.run_config)
            wants_resume, wants_overwrite = control["resume"], control["overwrite"]
        else:
            resolved, wants_resume, wants_overwrite = config, resume, overwrite
        run_on_grid(
            grid,
            resolved,
            run_dir or resolved.output_dir / resolved.name,
            resume=wants_resume,
            overwrite=wants_overwrite,
            discard_failed_start=discard_failed_start,
            on_round=on_round,
        )

    return app


app = server_app()
"""The ServerApp ``flwr run`` loads (config from the run config)."""

"""The Flower ClientApp: one SuperNode is one fedexperts client, the one its ``partition-id`` names.

Each message runs the same client step as the in-process runtime
(:func:`~fedexperts.federation.client.run_client`). The client's personal state (FLEx personal
experts and gates, ...) lives on the node's own disk, under ``state-dir/run-<run uid>/partition-<id>``
(the fedexperts run's own id, which the server sends with every task: a resumed ServerApp is a new
Flower run but the same fedexperts run), in safetensors files written atomically; ``context.state``
holds only a small record of what the node last did. A trained state is *staged*; it becomes
current when a later message says its round was accepted and checkpointed by the server
(``commit-round``), and anything else staged is dropped then, so a refused or lost update never
becomes the client's state.

In a deployment every message starts a fresh ClientApp process, so the node rebuilds its setting
each time (the base model is memory-mapped from safetensors; the time is reported as
``seconds_setup``). In a simulation the Ray actor keeps it between messages. For an algorithm that
names its clients' experts (FedMoE), a node never loads the full model: it prepares the algorithm
on a meta-device model and each step loads only the sub-MoE its downlink names
(:class:`~fedexperts.experiment.ClientModels`), whatever ``federation.client_model`` says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedexperts.config import ExperimentConfig
from fedexperts.data.expertbench import ExpertBench
from fedexperts.data.partition import Partition
from fedexperts.errors import FedExpertsError
from fedexperts.experiment import (
    Setting,
    build_setting,
    client_ids,
    federated_rows,
    with_clients,
    with_evaluation,
)
from fedexperts.federation.client import run_client
from fedexperts.federation.flower.runconfig import config_from_run_config
from fedexperts.federation.flower.wire import payload_to_record, record_to_payload, task_of
from fedexperts.federation.payload import transfer_dtype
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload, majority_category
from fedexperts.models.builtin import cache_root

PARTITION_ID, NUM_PARTITIONS, STATE_DIR = "partition-id", "num-partitions", "state-dir"
"""The node config keys a SuperNode is started with (``--node-config``)."""
MEMBER = "member"
"""The record of a query reply: who this node is, for the server's roster."""
_NODE_RECORD = "fedexperts"


def default_state_dir() -> Path:
    return cache_root() / "nodes"


def node_store(state_dir: Path, run_uid: str, partition: int) -> ClientStateStore:
    """The personal-state store of one partition in one fedexperts run (``run_uid``: its run directory's id)."""
    return ClientStateStore(Path(state_dir).expanduser() / f"run-{run_uid}" / f"partition-{partition}")


@dataclass
class _SettingCache:
    """The base model, algorithm and client data this process built, reused while the config is the same."""

    key: str = ""
    built: tuple[Setting, tuple[Partition, ExpertBench | None]] | None = None
    """The setting without client data (model, algorithm, evaluation sets) and every client's raw rows."""
    clients: dict[int, Setting] = field(default_factory=dict)

    def get(self, config: ExperimentConfig, partition: int) -> Setting:
        key = config.model_dump_json()
        if self.built is None or key != self.key:
            rows = federated_rows(config)
            base = with_evaluation(build_setting(config, only_clients=[], evaluation=False, node=True), rows)
            self.key, self.built, self.clients = key, (base, rows), {}
        if partition not in self.clients:
            base, rows = self.built
            self.clients[partition] = with_clients(base, [partition], rows)
        return self.clients[partition]


_CACHE = _SettingCache()


def _partition(context: Context, config: ExperimentConfig) -> int:
    node = context.node_config
    if PARTITION_ID not in node:
        raise FedExpertsError(f"this SuperNode has no {PARTITION_ID!r} in its node config (--node-config)")
    partition = node[PARTITION_ID]
    clients = config.federation.clients
    if not isinstance(partition, int) or not 0 <= partition < clients:
        raise FedExpertsError(f"node config {PARTITION_ID}={partition!r}: expected an integer in [0, {clients})")
    count = node.get(NUM_PARTITIONS, clients)
    if count != clients:
        raise FedExpertsError(f"node config {NUM_PARTITIONS}={count!r} but the run has federation.clients={clients}")
    return partition


def client_app(config: ExperimentConfig | None = None, state_dir: Path | None = None) -> ClientApp:
    """A ClientApp for ``config`` (default: the run config) keeping state under ``state_dir``.

    ``state_dir`` defaults to the node config's ``state-dir``, else ``$FEDEXPERTS_CACHE/nodes``.
    """
    app = ClientApp()

    def resolve(context: Context) -> tuple[ExperimentConfig, int, Path]:
        resolved = config or config_from_run_config(context.run_config)
        folder = state_dir or Path(str(context.node_config.get(STATE_DIR) or default_state_dir()))
        return resolved, _partition(context, resolved), folder

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        resolved, partition, _folder = resolve(context)
        client = _CACHE.get(resolved, partition).client(client_ids(resolved.federation.clients)[partition])
        member: dict[str, ConfigRecordValues] = {
            "client-id": client.client_id,
            "partition-id": partition,
            "examples": client.num_examples,
            "group": majority_category(client.categories) or client.client_id,
        }
        return Message(RecordDict({MEMBER: ConfigRecord(member)}), reply_to=msg)

    def step(msg: Message, context: Context) -> Message:
        resolved, partition, folder = resolve(context)
        started = time.perf_counter()
        setting = _CACHE.get(resolved, partition)
        setup_seconds = time.perf_counter() - started
        task, commit_round, run_uid = task_of(msg.content)
        own = client_ids(resolved.federation.clients)[partition]
        if task.client_id != own:
            raise FedExpertsError(f"this node serves {own} (partition {partition}), not {task.client_id}")
        store = node_store(folder, run_uid, partition)
        if commit_round:
            store.commit(commit_round)
        store.discard_staged(after=0)
        reply = run_client(setting, store, task, record_to_payload(msg.content, sender="the server"))
        context.state[_NODE_RECORD] = ConfigRecord({"client-id": own, "round": task.round})
        metadata = {**reply.metadata, "seconds_setup": setup_seconds}
        dtype = transfer_dtype(resolved.federation.transfer_dtype)
        return Message(payload_to_record(Payload(reply.tensors, metadata), dtype=dtype), reply_to=msg)

    app.train()(step)
    app.evaluate()(step)
    return app


app = client_app()
"""The ClientApp ``flwr run`` loads (config from the run config, state dir from the node config)."""

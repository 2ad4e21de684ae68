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
each time: from the node cache (:mod:`~fedexperts.federation.flower.nodecache`, under ``cache-dir``:
the base model memory-mapped, the partition already tokenized; ``cache-dir=""`` turns it off), and
the time is reported as ``seconds_setup``. In a simulation each Ray actor builds from the same cache
once, keeps its setting and clients between messages, and runs as many torch threads as it has
cores (``threads``). For an algorithm that
names its clients' experts (FedMoE), a node never loads the full model: it prepares the algorithm
on a meta-device model and each step loads only the sub-MoE its downlink names
(:class:`~fedexperts.experiment.ClientModels`), whatever ``federation.client_model`` says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedexperts.config import ExperimentConfig
from fedexperts.errors import FedExpertsError
from fedexperts.experiment import Setting, build_setting, client_ids, with_clients, with_evaluation
from fedexperts.federation.client import run_client
from fedexperts.federation.flower.nodecache import FederatedRows, NodeCache, node_base, node_client
from fedexperts.federation.flower.runconfig import config_from_run_config
from fedexperts.federation.flower.wire import payload_to_record, record_to_payload, task_of
from fedexperts.federation.payload import transfer_dtype
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload, majority_category
from fedexperts.models.builtin import cache_root

PARTITION_ID, NUM_PARTITIONS, STATE_DIR, CACHE_DIR = "partition-id", "num-partitions", "state-dir", "cache-dir"
"""The node config keys a SuperNode is started with (``--node-config``)."""
THREADS = "threads"
"""Optional node config key: torch threads per ClientApp process (SuperNodes sharing a machine's cores)."""
MEMBER = "member"
"""The record of a query reply: who this node is, for the server's roster."""
_NODE_RECORD = "fedexperts"


def default_state_dir() -> Path:
    return cache_root() / "nodes"


def default_cache_dir() -> Path:
    return cache_root() / "node-cache"


def node_store(state_dir: Path, run_uid: str, partition: int) -> ClientStateStore:
    """The personal-state store of one partition in one fedexperts run (``run_uid``: its run directory's id)."""
    return ClientStateStore(Path(state_dir).expanduser() / f"run-{run_uid}" / f"partition-{partition}")


@dataclass
class _SettingCache:
    """The base model, algorithm and client data this process built, reused while the config is the same."""

    key: str = ""
    base: Setting | None = None
    """The setting without client data (model, algorithm, evaluation sets)."""
    rows: FederatedRows | None = None
    """Every client's raw rows, read only when something is built (not from the node cache)."""
    clients: dict[int, Setting] = field(default_factory=dict)

    def get(self, config: ExperimentConfig, partition: int, cache: NodeCache | None) -> Setting:
        key = config.model_dump_json()
        if self.base is None or self.rows is None or key != self.key:
            rows = FederatedRows(config)
            if cache is not None:
                base = node_base(config, cache, rows)
            else:
                base = with_evaluation(build_setting(config, only_clients=[], evaluation=False, node=True), rows())
            self.key, self.base, self.rows, self.clients = key, base, rows, {}
        if partition not in self.clients:
            if cache is not None:
                client = node_client(self.base, cache, partition, self.rows)
                self.clients[partition] = replace(self.base, clients=(client,))
            else:
                self.clients[partition] = with_clients(self.base, [partition], self.rows())
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


def _node_cache(context: Context, cache_dir: Path | None) -> NodeCache | None:
    """``cache_dir``, else the node config's ``cache-dir`` (``""``: no cache), else the default folder."""
    if cache_dir is not None:
        return NodeCache(cache_dir)
    folder = context.node_config.get(CACHE_DIR)
    if folder == "":
        return None
    return NodeCache(Path(str(folder)).expanduser() if folder is not None else default_cache_dir())


def client_app(
    config: ExperimentConfig | None = None,
    state_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> ClientApp:
    """A ClientApp for ``config`` (default: the run config) keeping state under ``state_dir``.

    ``state_dir`` defaults to the node config's ``state-dir``, else ``$FEDEXPERTS_CACHE/nodes``;
    ``cache_dir`` (the node cache) to the node config's ``cache-dir``, else
    ``$FEDEXPERTS_CACHE/node-cache``. ``threads``: torch threads for every message (a simulation's
    cores per client); ``None``: the node config's ``threads``, else torch's choice.
    """
    app = ClientApp()

    def resolve(context: Context) -> tuple[ExperimentConfig, int, Path, Setting]:
        wanted = threads or context.node_config.get(THREADS, 0)
        if not isinstance(wanted, int) or wanted < 0:
            raise FedExpertsError(f"node config {THREADS}={wanted!r}: expected a number of threads (0: torch's)")
        if wanted and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        resolved = config or config_from_run_config(context.run_config)
        folder = state_dir or Path(str(context.node_config.get(STATE_DIR) or default_state_dir()))
        partition = _partition(context, resolved)
        return resolved, partition, folder, _CACHE.get(resolved, partition, _node_cache(context, cache_dir))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        resolved, partition, _folder, setting = resolve(context)
        client = setting.client(client_ids(resolved.federation.clients)[partition])
        member: dict[str, ConfigRecordValues] = {
            "client-id": client.client_id,
            "partition-id": partition,
            "examples": client.num_examples,
            "group": majority_category(client.categories) or client.client_id,
        }
        return Message(RecordDict({MEMBER: ConfigRecord(member)}), reply_to=msg)

    def step(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        resolved, partition, folder, setting = resolve(context)
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

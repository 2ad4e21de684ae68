"""Hostile replies are refused, each with its rule, and never aggregated: the same 15 cases on both runtimes.

In-process, a transport tampers with each decoded reply before the server sees it; on Flower, the real
ServerApp transport and the real ClientApp exchange real Flower Messages through a Grid that tampers with
the reply Message's content (no Ray: the Grid is the only stand-in). Both reach the same server checks
(:mod:`fedexperts.federation.replies` and the algorithm's ``check_update``).

To stay cheap, one client per exchange really runs its step; every other client's reply is that real reply
re-addressed to it (its id, round and nonce, one example: an honest reply of the right shapes), then tampered.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedexperts.experiment import build_setting
from fedexperts.federation.client import CLIENT_FIELD, NONCE_FIELD, ROUND_FIELD, ClientTask
from fedexperts.federation.flower import clientapp
from fedexperts.federation.flower.clientapp import CACHE_DIR, NUM_PARTITIONS, PARTITION_ID, STATE_DIR, client_app
from fedexperts.federation.flower.serverapp import run_on_grid
from fedexperts.federation.flower.wire import payload_to_record, record_to_payload
from fedexperts.federation.inprocess import InProcessTransport, members_of
from fedexperts.federation.payload import decode, encode
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.federation.runstore import CLIENTS
from fedexperts.federation.server import Federation
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload
from tests.federation.helpers import cheap_config, final_state

METADATA_LIMIT = 4096


def _first(payload: Payload) -> str:
    return sorted(payload.tensors)[0]


def _with_tensor(payload: Payload, name: str, tensor: torch.Tensor) -> Payload:
    return Payload({**payload.tensors, name: tensor}, payload.metadata)


def _with_metadata(payload: Payload, **changes: object) -> Payload:
    return Payload(payload.tensors, {**payload.metadata, **changes})


def _poisoned(value: float) -> Callable[[Payload, dict], Payload]:
    def tamper(payload: Payload, _history: dict) -> Payload:
        name = _first(payload)
        tensor = payload.tensors[name].clone()
        tensor.view(-1)[0] = value
        return _with_tensor(payload, name, tensor)

    return tamper


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _replayed(round_number: int, client: str, *, relabel: bool) -> Callable[[Payload, dict], Payload]:
    """The client's honest reply of an earlier round, sent again (``relabel``: claiming the current round)."""

    def tamper(payload: Payload, history: dict) -> Payload:
        old = history[(round_number, client)]
        return _with_metadata(old, **{ROUND_FIELD: payload.metadata[ROUND_FIELD]}) if relabel else old

    return tamper


Tamper = Callable[[Payload, dict], Payload]
CASES: dict[tuple[int, str], tuple[str, Tamper]] = {
    # round 1 (client-5 honest)
    (1, "client-0"): ("dtype", lambda p, h: _with_tensor(p, _first(p), p.tensors[_first(p)].double())),
    (1, "client-1"): ("shape", lambda p, h: _with_tensor(p, _first(p), torch.cat([p.tensors[_first(p)]] * 2))),
    (1, "client-2"): ("non-finite", _poisoned(float("nan"))),
    (1, "client-3"): ("non-finite", _poisoned(float("inf"))),
    (1, "client-4"): ("keys", lambda p, h: Payload({k: v for k, v in p.tensors.items() if k != _first(p)}, p.metadata)),
    # round 2 (client-0 honest)
    (2, "client-1"): ("keys", lambda p, h: _with_tensor(p, "smuggled.weight", torch.zeros(3))),
    (2, "client-2"): ("size", lambda p, h: _with_tensor(p, _first(p) + ".big", torch.zeros(4 << 20))),
    (2, "client-3"): ("metadata", lambda p, h: _with_metadata(p, note="x" * (2 * METADATA_LIMIT))),
    (2, "client-4"): ("metadata", lambda p, h: _with_metadata(p, deep=_nested(40))),
    (2, "client-5"): ("round", _replayed(1, "client-5", relabel=False)),
    # round 3 (client-1 honest)
    (3, "client-0"): ("nonce", _replayed(2, "client-0", relabel=True)),
    (3, "client-2"): ("identity", lambda p, h: _with_metadata(p, **{CLIENT_FIELD: "client-1"})),
    (3, "client-3"): ("examples", lambda p, h: _with_metadata(p, examples=0)),
    (3, "client-4"): ("examples", lambda p, h: _with_metadata(p, examples=10**9)),
    (3, "client-5"): ("metadata", lambda p, h: _with_metadata(p, train_loss="low")),
}
HONEST = {1: "client-5", 2: "client-0", 3: "client-1"}


class Tamperer:
    """Forges each client's reply from the exchange's one real reply, applies :data:`CASES`, remembers honest ones."""

    def __init__(self) -> None:
        self.history: dict[tuple[int, str], Payload] = {}

    def __call__(self, task: ClientTask, real: Payload) -> Payload:
        bound = {CLIENT_FIELD: task.client_id, ROUND_FIELD: task.round, NONCE_FIELD: task.nonce}
        reply = Payload(dict(real.tensors), {**real.metadata, **bound, "examples": 1})
        case = CASES.get((task.round, task.client_id)) if task.train else None
        if case is None:
            self.history[(task.round, task.client_id)] = reply
            return reply
        return case[1](reply, self.history)


class TamperingTransport(InProcessTransport):
    def __init__(self, *args, tamperer: Tamperer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tamperer = tamperer

    def exchange(self, tasks):
        real = self._one(*tasks[0])
        assert real.reply is not None, real.error
        deliveries = {}
        for task, _downlink in tasks:
            up = encode(self.tamperer(task, real.reply))
            deliveries[task.client_id] = dataclasses.replace(real, bytes_up=len(up), reply=decode(up))
        return deliveries


class TamperingGrid:
    """A Flower Grid that hands the first message of each push to the real ClientApp of its node, and answers
    every message with that reply re-addressed and tampered (real Flower Messages, replying to each message)."""

    def __init__(self, config, state_dir, tamperer: Tamperer) -> None:
        self.app = client_app(config, state_dir)
        clients = config.federation.clients
        self.nodes = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={
                    PARTITION_ID: node - 1,
                    NUM_PARTITIONS: clients,
                    STATE_DIR: str(state_dir),
                    CACHE_DIR: str(state_dir / "cache"),
                },
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, clients + 1)
        }
        self.tamperer = tamperer
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids, real = [], None
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's in-memory Grid does
            if message.metadata.message_type == "query" or real is None:
                reply = self.app(message, self.nodes[message.metadata.dst_node_id])
            if message.metadata.message_type != "query":
                real = real or record_to_payload(reply.content, sender="node")
                task = ClientTask(**json.loads(str(message.content["config"]["task"])))
                reply = Message(payload_to_record(self.tamperer(task, real)), reply_to=message)
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def _config(micro_model_path, tmp_path):
    return cheap_config(
        micro_model_path,
        tmp_path / "runs",
        "federation.clients=6",
        "federation.rounds=3",
        "train.steps_per_round=1",
        f"federation.max_reply_metadata_bytes={METADATA_LIMIT}",
    )


def _run_in_process(config, run_dir, tamperer, monkeypatch):
    prepare_run_dir(config, run_dir, resume=False, overwrite=False)
    setting = build_setting(config)
    transport = TamperingTransport(setting, ClientStateStore(run_dir / CLIENTS), tamperer=tamperer)
    members = members_of(setting)
    return Federation(
        config, run_dir, algorithm=setting.algorithm, model=setting.model, members=members, transport=transport
    ).run()


def _run_on_flower(config, run_dir, tamperer, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # what Flower's ServerApp process sets for its Messages
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    # the ClientApp's process-wide setting cache, emptied again afterwards: a Ray simulation later in this process
    # pickles the ClientApp, and a built model (weak references) in the cache cannot be pickled
    monkeypatch.setattr(clientapp, "_CACHE", clientapp._SettingCache())
    return run_on_grid(TamperingGrid(config, run_dir.parent / "nodes", tamperer), config, run_dir).records


@pytest.mark.parametrize("runtime", ["in-process", "flower"])
def test_each_hostile_reply_is_refused_by_its_rule_and_only_honest_ones_are_aggregated(
    micro_model_path, tmp_path, runtime, monkeypatch
):
    config = _config(micro_model_path, tmp_path)
    tamperer = Tamperer()
    run_dir = tmp_path / runtime
    records = (_run_in_process if runtime == "in-process" else _run_on_flower)(config, run_dir, tamperer, monkeypatch)

    rounds = {record["round"]: record for record in records if record["kind"] == "round"}
    seen = 0
    for (round_number, client), (rule, _tamper) in CASES.items():
        entry = rounds[round_number]["clients"][client]
        assert (entry["status"], entry.get("refused")) == ("rejected", rule), (round_number, client, entry["error"])
        assert "tensor(" not in entry["error"]  # counts and names, never values
        seen += 1
    assert seen == 15
    for round_number, client in HONEST.items():
        assert rounds[round_number]["clients"][client]["status"] == "ok"
    # round 3's global state is exactly what its one accepted reply sent (FedAvg, server lr 1)
    kept = final_state(run_dir)
    honest = tamperer.history[(3, HONEST[3])]
    for name, tensor in honest.tensors.items():
        torch.testing.assert_close(kept[f"global/{name}"], tensor, rtol=0, atol=1e-7)


def test_fedmoe_rows_of_experts_the_client_does_not_hold_are_refused(sizes_fedmoe):
    """A FedMoE client claiming, or sending rows of, experts it was not given (the algorithm's own check)."""
    from fedexperts.interface import ClientInfo, PayloadError
    from tests.algorithms.fedmoe.common import fedmoe, filled, per_layer, prepared

    algorithm = fedmoe({"c0": sizes_fedmoe - 1})
    model, state = prepared(algorithm)
    algorithm.assign("c0", per_layer(0, 1))
    reply = filled(algorithm, model, state, "c0", 1.0)
    claims = dict(reply.metadata)
    claims["fedmoe_held"] = {layer: [0, 5] for layer in claims["fedmoe_held"]}
    row = next(name for name in algorithm.layout.rows)
    extra = torch.cat([reply.tensors[row], reply.tensors[row][:1]])
    for hostile in (Payload(reply.tensors, claims), _with_tensor(reply, row, extra)):
        with pytest.raises(PayloadError) as refused:
            algorithm.check_update(hostile, state, ClientInfo("c0", 1))
        assert refused.value.rule == "experts"


@pytest.fixture(scope="module")
def sizes_fedmoe():
    from fedexperts.models import tiny_model
    from tests.algorithms.fedmoe.common import fedmoe

    probe = fedmoe(budget_fraction=1.0)
    probe.prepare(tiny_model("olmoe"))
    return probe.full_bytes


def test_a_nonce_is_fresh_per_message_and_the_reply_echoes_it():
    from fedexperts.federation.client import binding
    from fedexperts.federation.replies import check_binding, new_nonce
    from fedexperts.interface import PayloadError

    first, second = new_nonce(), new_nonce()
    assert first != second and len(first) == len(second) == 32
    task = ClientTask("client-0", 2, nonce=first)
    check_binding(binding(task), task)
    with pytest.raises(PayloadError, match="nonce"):
        check_binding({**binding(task), NONCE_FIELD: second}, task)

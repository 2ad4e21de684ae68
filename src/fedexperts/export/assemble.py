"""A run directory -> the torch model a client evaluated, or the federation's shared model.

The client model is rebuilt by the runtime's own path: the saved config's setting (base model,
algorithm prepared as in the run), the last committed checkpoint (global state and the
algorithm's server state; after the last round ``algorithm.finish()``, as before the final
evaluation), the client's downlink through the wire format, its committed personal state, and
:func:`fedexperts.federation.client.start_client` for the step after the last committed round (the
final evaluation, for a finished run). So the model is the one the run scored, tensor for tensor.
The client's data is read only if the algorithm asks for it (FLEx calibrating a client that never
trained).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedexperts.data.templates import PromptTemplate
from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import pad_token_id
from fedexperts.experiment import Setting, build_setting, federated_rows, with_clients
from fedexperts.export.source import RunSource
from fedexperts.federation.client import row_batches, start_client
from fedexperts.federation.payload import decode, encode, transfer_dtype
from fedexperts.federation.runstore import CHECKPOINTS, CLIENTS
from fedexperts.federation.server import restore_checkpoint
from fedexperts.federation.state import CheckpointStore, ClientStateStore
from fedexperts.interface import ClientInfo, LocalData, State, parse_row_key
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.params import ParamKind, Role, parameter_kinds
from fedexperts.moe.personal import remove_personal_experts
from fedexperts.runfiles import mismatch


@dataclass(frozen=True)
class Assembled:
    """An exportable model and where it came from."""

    model: nn.Module
    setting: Setting
    source: RunSource
    client_id: str | None
    """``None``: the shared (global) model."""

    @property
    def tokenizer(self) -> Any:
        return self.setting.tokenizer

    @property
    def template(self) -> PromptTemplate:
        return self.setting.template


def _checked(source: RunSource, path: Path) -> None:
    """The file is the one the run wrote (size and sha256 in its manifest)."""
    entry = source.manifest.entry(path)
    problem = "is not listed in the run's manifest" if entry is None else mismatch(path, entry)
    if problem is not None:
        raise FedExpertsError(f"{path} {problem}; cannot export from it")


def _global_state(source: RunSource, setting: Setting) -> State:
    store = CheckpointStore(source.run_dir / CHECKPOINTS)
    _checked(source, store.path(source.rounds_done))
    return restore_checkpoint(store.load(source.rounds_done), setting.algorithm)


def _examples(source: RunSource, client_id: str) -> int:
    """The client's training examples as the run recorded them (0 when it never took part)."""
    for record in reversed(source.record.rounds):
        if client_id in record.clients:
            return int(record.clients[client_id].examples)
    return 0


def _lazy_batches(setting: Setting, index: int) -> Any:
    """The client's training batches in the run's order, its data read on the first call only."""
    rows: list[Any] = []

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        if not rows:
            client = with_clients(setting, [index], federated_rows(setting.config)).clients[0]
            rows.extend(client.train)
        return row_batches(rows, pad_token_id(setting.tokenizer))

    return batches


def _check_personal_state(source: RunSource, setting: Setting, path: Path, client_id: str) -> None:
    """The client's committed state is the one the run wrote, or there is none because it never trained.

    A Flower run keeps clients' states on the SuperNodes, not here: a client of an algorithm with
    personal tensors that trained but has no state in the run directory cannot be rebuilt from it.
    """
    if path.exists() or source.manifest.entry(path) is not None:
        _checked(source, path)
        return
    trained = [r.round for r in source.record.rounds if r.clients.get(client_id) and r.clients[client_id].train_loss]
    if trained and any(role is Role.PERSONAL for role in setting.algorithm.roles.values()):
        raise FedExpertsError(
            f"{source.run_dir} holds no personal state of {client_id}, which trained in round {trained[-1]} "
            "(a Flower run keeps it on the SuperNode that served the client); its model cannot be rebuilt from here"
        )


def assemble_client(source: RunSource, client_id: str) -> Assembled:
    """The model ``client_id`` evaluated after the last committed round (see the module docstring)."""
    index = source.client_index(client_id)
    setting = build_setting(source.config, only_clients=[], evaluation=False)
    algorithm = setting.algorithm
    global_state = _global_state(source, setting)
    if source.finished:
        algorithm.finish()
    info = ClientInfo(client_id, _examples(source, client_id))
    wire = transfer_dtype(source.config.federation.transfer_dtype)
    received = decode(encode(algorithm.downlink(global_state, info), dtype=wire))
    store = ClientStateStore(source.run_dir / CLIENTS)
    _check_personal_state(source, setting, store.path(client_id), client_id)
    data = LocalData(info, _lazy_batches(setting, index), source.step_round)
    context = start_client(setting, store, index, received, data)
    if context.idle:
        raise FedExpertsError(
            f"{client_id} has no model after round {source.rounds_done}: {algorithm.name} gives it none yet"
        )
    context.model.eval()
    return Assembled(context.model, setting, source, client_id)


@torch.no_grad()
def assemble_global(source: RunSource) -> Assembled:
    """The shared model: the base with the last global state, without any client's personal parts.

    Grafted personal experts and gates (personal by nature) are removed; personal tensors of the
    base (a client-kept expert row) keep their pretrained values. An algorithm that shares nothing
    (local training) has no global model.
    """
    setting = build_setting(source.config, only_clients=[], evaluation=False)
    algorithm = setting.algorithm
    if not any(role is Role.SHARED for role in algorithm.roles.values()):
        raise FedExpertsError(
            f"--global: {algorithm.name} shares nothing (every client trains its own copy), so {source.run_dir} "
            "has no global model; export a client's model with --client"
        )
    global_state = _global_state(source, setting)
    base = unwrap_model(setting.model)
    kinds = parameter_kinds(base)
    grafted = {
        name for name, info in kinds.items() if info.kind in (ParamKind.PERSONAL_EXPERT, ParamKind.PERSONAL_GATE)
    }
    remove_personal_experts(base)
    params = dict(base.named_parameters())
    for key, tensor in global_state.items():
        name, row = parse_row_key(key)
        if name in grafted:
            continue  # a shared personal gate (FLEx share_gate) belongs to the grafts, not the base
        target = params[name] if row is None else params[name][row]
        target.copy_(tensor)
    base.eval()
    return Assembled(base, setting, source, None)

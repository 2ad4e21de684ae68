"""The single-process runtime: sampled clients run one after another on one loaded base model.

Every message is really encoded and decoded (safetensors bytes), so the byte counts are exact
and the server validates what it would receive over a network. The server loop (sampling,
validation, aggregation, records, checkpoints, resume) is :class:`~fedexperts.federation.server.Federation`;
this module is its in-process transport, which calls the client step directly and keeps every
client's personal state in the run directory.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedexperts.algorithms.base import majority_category
from fedexperts.atomic import atomic_file
from fedexperts.config import ExperimentConfig, build_config
from fedexperts.experiment import Setting, build_setting
from fedexperts.federation.client import ClientTask, run_client
from fedexperts.federation.payload import Payload, decode, encode, transfer_dtype
from fedexperts.federation.server import (
    METRICS_FILE,
    Delivery,
    Federation,
    Member,
    RunError,
    restore_checkpoint,
    sample_clients,
)
from fedexperts.federation.state import ClientStateStore

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "InProcessTransport",
    "RunError",
    "RunResult",
    "members_of",
    "prepare_run_dir",
    "restore_checkpoint",
    "run_experiment",
    "sample_clients",
]

CONFIG_FILE = "config.toml"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    """The lines of ``metrics.jsonl``."""


def members_of(setting: Setting) -> dict[str, Member]:
    """The server's view of a setting's clients (in-process, the server may read it directly)."""
    return {
        client.client_id: Member(
            client.client_id, client.num_examples, majority_category(client.categories) or client.client_id
        )
        for client in setting.clients
    }


class InProcessTransport:
    """Runs each task by calling the client step in this process; personal states live under ``run_dir/clients``."""

    def __init__(self, setting: Setting, store: ClientStateStore) -> None:
        self.setting = setting
        self.store = store

    def exchange(self, tasks: Sequence[tuple[ClientTask, Payload]]) -> dict[str, Delivery]:
        return {task.client_id: self._one(task, downlink) for task, downlink in tasks}

    def _one(self, task: ClientTask, downlink: Payload) -> Delivery:
        started = time.perf_counter()
        dtype = transfer_dtype(self.setting.config.federation.transfer_dtype)
        down = encode(downlink, dtype=dtype)
        try:
            up = encode(run_client(self.setting, self.store, task, decode(down)), dtype=dtype)
        except Exception as error:  # a client that raises is recorded; the round goes on without it
            return Delivery(len(down), error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - started)
        return Delivery(len(down), len(up), decode(up), seconds=time.perf_counter() - started)

    def reject(self, task: ClientTask) -> None:
        self.store.unstage(task.round, task.client_id)

    def commit(self, round_number: int, accepted: Sequence[str]) -> None:
        self.store.commit(round_number)

    def resume(self, done: int) -> None:
        if done:
            self.store.commit(done)
        self.store.discard_staged(after=done)


def _config_toml(config: ExperimentConfig) -> str:
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def _check_same_config(run_dir: Path, config: ExperimentConfig) -> None:
    import tomllib

    saved = build_config(tomllib.loads((run_dir / CONFIG_FILE).read_text()))
    mine, theirs = config.model_dump(mode="json"), saved.model_dump(mode="json")
    differing = sorted(_differences(mine, theirs))
    if differing:
        raise RunError(
            f"{run_dir} holds a run of a different config (differs in {', '.join(differing)}); "
            "resume with the same config, or choose another run directory"
        )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found.extend(_differences(left, right, f"{prefix}{key}."))
        elif left != right and key != "output_dir":
            found.append(f"{prefix}{key}")
    return found


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Create ``run_dir`` with the resolved config, or check it for ``resume``; never clobber a run silently."""
    exists = (run_dir / CONFIG_FILE).exists()
    if exists and overwrite:
        shutil.rmtree(run_dir)
        exists = False
    if resume and not exists:
        raise RunError(f"nothing to resume: {run_dir} holds no run (no {CONFIG_FILE})")
    if exists and not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    if exists:
        _check_same_config(run_dir, config)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / CONFIG_FILE) as path:
        path.write_text(_config_toml(config))


def run_experiment(
    config: ExperimentConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    setting: Setting | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run (or resume) ``config`` in this process and write the run directory."""
    target = run_dir or config.output_dir / config.name
    prepare_run_dir(config, target, resume=resume, overwrite=overwrite)
    setting = setting or build_setting(config)
    federation = Federation(
        config,
        target,
        algorithm=setting.algorithm,
        model=setting.model,
        members=members_of(setting),
        transport=InProcessTransport(setting, ClientStateStore(target / "clients")),
        on_round=on_round,
    )
    return RunResult(target, federation.run())

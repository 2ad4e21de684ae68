"""The single-process runtime: sampled clients run one after another on one loaded base model.

Every message is really encoded and decoded (safetensors bytes), so the byte counts are exact
and the server validates what it would receive over a network. After each round the runtime
writes, in this order: the round's record, the server checkpoint (global state and server
optimizer state), then commits the clients' staged personal states. ``resume`` restarts from the
newest checkpoint, finishes a half-done commit, drops work of the unfinished round, and redoes
it with the same seeds, so a resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedexperts.algorithms import Algorithm, ClientInfo, ClientUpdate
from fedexperts.algorithms.aggregation import State
from fedexperts.algorithms.base import majority_category
from fedexperts.atomic import atomic_file
from fedexperts.config import ExperimentConfig, build_config
from fedexperts.errors import FedExpertsError
from fedexperts.experiment import Setting, build_setting, client_ids
from fedexperts.federation.client import ClientTask, run_client
from fedexperts.federation.payload import Payload, PayloadError, check_metadata_numbers, decode, encode
from fedexperts.federation.state import CheckpointStore, ClientStateStore
from fedexperts.moe.params import Role

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
_GLOBAL, _SERVER, _SERVER_METADATA = "global/", "server/", "server"


def restore_checkpoint(checkpoint: Payload, algorithm: Algorithm) -> State:
    """Load a checkpoint's server state into ``algorithm`` and return its global state."""
    server = {k[len(_SERVER) :]: v for k, v in checkpoint.tensors.items() if k.startswith(_SERVER)}
    algorithm.load_server_state(Payload(server, checkpoint.metadata.get(_SERVER_METADATA, {})))
    return {k[len(_GLOBAL) :]: v for k, v in checkpoint.tensors.items() if k.startswith(_GLOBAL)}


class RunError(FedExpertsError):
    """A run that cannot start, continue or complete (e.g. too few successful clients in a round)."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    """The lines of ``metrics.jsonl``."""


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
    count = min(len(ids), max(minimum, math.ceil(fraction * len(ids))))
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


def _eval_record(metadata: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    keys = ("loss", "exact_match", "rouge_l", "examples")
    if f"{prefix}_loss" not in metadata:
        return None
    return {key: metadata[f"{prefix}_{key}"] for key in keys}


class InProcessRuntime:
    """Runs one experiment in this process; see the module docstring for the on-disk protocol."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path,
        *,
        setting: Setting | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.setting = setting or build_setting(config)
        self.algorithm = self.setting.algorithm
        self.ids = client_ids(config.federation.clients)
        self.store = ClientStateStore(run_dir / "clients")
        self.checkpoints = CheckpointStore(run_dir / "checkpoints")
        self.on_round = on_round or (lambda record: None)

    # -- records ---------------------------------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        return self.run_dir / "records" / f"{name}.json"

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        with atomic_file(self._record_path(name)) as path:
            path.write_text(json.dumps(record, allow_nan=False))

    def records(self) -> list[dict[str, Any]]:
        folder = self.run_dir / "records"
        names = sorted(path.stem for path in folder.glob("round-*.json")) if folder.is_dir() else []
        lines = [json.loads(self._record_path("run").read_text())]
        lines.extend(json.loads(self._record_path(name).read_text()) for name in names)
        if self._record_path("final").exists():
            lines.append(json.loads(self._record_path("final").read_text()))
        return lines

    def _write_metrics(self) -> list[dict[str, Any]]:
        lines = self.records()
        with atomic_file(self.run_dir / METRICS_FILE) as path:
            path.write_text("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
        return lines

    def _run_record(self) -> dict[str, Any]:
        roles = self.algorithm.roles
        params = dict(self.setting.model.named_parameters())
        by_role = {role: sum(params[name].numel() for name, r in roles.items() if r is role) for role in Role}
        return {
            "kind": "run",
            "name": self.config.name,
            "algorithm": str(self.config.algorithm.name),
            "seed": self.config.federation.seed,
            "clients": self.ids,
            "rounds": self.config.federation.rounds,
            "model": self.config.model.name,
            "parameters": {
                "total": sum(p.numel() for p in params.values()),
                "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
                "shared": by_role[Role.SHARED],
                "personal": by_role[Role.PERSONAL],
                "frozen": by_role[Role.FROZEN],
            },
        }

    # -- state -----------------------------------------------------------------------------------------
    def _restore(self) -> tuple[int, State]:
        """The last completed round and the global state after it (server optimizer restored too)."""
        latest = self.checkpoints.latest()
        if latest is None:
            self.store.discard_staged(after=0)
            return 0, self.algorithm.initial_global_state(self.setting.model)
        done, checkpoint = latest
        self.store.commit(done)
        self.store.discard_staged(after=done)
        for path in (self.run_dir / "records").glob("round-*.json"):
            if int(path.stem.split("-")[1]) > done:
                path.unlink()
        return done, restore_checkpoint(checkpoint, self.algorithm)

    def _checkpoint(self, round_number: int, global_state: State) -> None:
        server = self.algorithm.server_state()
        tensors = {_GLOBAL + k: v for k, v in global_state.items()}
        tensors.update({_SERVER + k: v for k, v in server.tensors.items()})
        self.checkpoints.save(round_number, Payload(tensors, {_SERVER_METADATA: server.metadata}))

    # -- one client ------------------------------------------------------------------------------------
    def _exchange(self, task: ClientTask, global_state: State) -> tuple[dict[str, Any], ClientUpdate | None]:
        """Send, run, receive and validate one client; a failure is recorded, never raised."""
        client = self.setting.client(task.client_id)
        entry: dict[str, Any] = {"status": "ok", "error": None, "examples": client.num_examples}
        started = time.perf_counter()
        down = encode(self.algorithm.downlink(global_state, ClientInfo(client.client_id, client.num_examples)))
        entry["bytes_down"] = len(down)
        try:
            up = encode(run_client(self.setting, self.store, task, decode(down)))
        except Exception as error:  # a client that raises is recorded; the round goes on without it
            entry.update(status="failed", error=f"{type(error).__name__}: {error}", bytes_up=0)
            self.store.unstage(task.round, task.client_id)
            entry["seconds"] = {"train": 0.0, "eval": 0.0, "total": time.perf_counter() - started}
            return entry, None
        entry["bytes_up"] = len(up)
        reply = decode(up)
        metadata = reply.metadata
        entry.update(
            train_loss=metadata.get("train_loss"),
            eval=_eval_record(metadata, "eval"),
            peak_memory_bytes=metadata.get("peak_memory_bytes", 0),
            seconds={
                "train": metadata.get("seconds_train", 0.0),
                "eval": metadata.get("seconds_eval", 0.0),
                "total": time.perf_counter() - started,
            },
        )
        if task.union or task.probes:
            entry.update(union=_eval_record(metadata, "union"), probes=metadata.get("probes"))
        update = None
        if task.train:
            info = ClientInfo(client.client_id, int(metadata.get("examples", 0)))
            try:
                check_metadata_numbers(metadata, sender=client.client_id)
                if info.num_examples < 1:
                    raise PayloadError(f"{client.client_id}: reports {info.num_examples} training examples")
                self.algorithm.check_update(reply, global_state, info)
            except PayloadError as error:
                entry.update(status="rejected", error=str(error))
                self.store.unstage(task.round, task.client_id)
                return entry, None
            update = ClientUpdate(info, reply)
        return entry, update

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        federation = self.config.federation
        done, global_state = self._restore()
        if not self._record_path("run").exists():
            self._write_record("run", self._run_record())
        for round_number in range(done + 1, federation.rounds + 1):
            global_state = self._round(round_number, global_state)
        if not self._record_path("final").exists():
            self._final(global_state)
        return self._write_metrics()

    def _majority_categories(self) -> list[str]:
        return [majority_category(self.setting.client(cid).categories) or cid for cid in self.ids]

    def _round(self, round_number: int, global_state: State) -> State:
        federation = self.config.federation
        started = time.perf_counter()
        sampled = sample_clients(
            self.ids,
            fraction=federation.fraction,
            minimum=federation.min_clients,
            seed=federation.seed,
            round_number=round_number,
            groups=self._majority_categories() if federation.sampling == "distinct" else None,
        )
        every = self.config.eval.every
        evaluate = every > 0 and (round_number - 1) % every == 0
        entries, updates = {}, []
        for client_id in sampled:
            entry, update = self._exchange(ClientTask(client_id, round_number, evaluate=evaluate), global_state)
            entries[client_id] = entry
            if update is not None:
                updates.append(update)
        if len(updates) < federation.min_successful:
            problems = "; ".join(f"{cid}: {e['error']}" for cid, e in entries.items() if e["error"])
            raise RunError(
                f"round {round_number}: {len(updates)} of {len(sampled)} clients succeeded, fewer than "
                f"federation.min_successful={federation.min_successful} ({problems})"
            )
        aggregate_start = time.perf_counter()
        global_state = self.algorithm.aggregate(global_state, updates)
        aggregate_seconds = time.perf_counter() - aggregate_start
        round_seconds = time.perf_counter() - started
        train = sum(e["seconds"]["train"] for e in entries.values())
        evaluation = sum(e["seconds"]["eval"] for e in entries.values())
        record = {
            "kind": "round",
            "round": round_number,
            "sampled": sampled,
            "clients": entries,
            "bytes_down": sum(e["bytes_down"] for e in entries.values()),
            "bytes_up": sum(e["bytes_up"] for e in entries.values()),
            "seconds": {
                "round": round_seconds,
                "train": train,
                "eval": evaluation,
                "aggregate": aggregate_seconds,
                "overhead": max(round_seconds - train - evaluation - aggregate_seconds, 0.0),
            },
        }
        self._write_record(f"round-{round_number:06d}", record)
        self._checkpoint(round_number, global_state)
        self.store.commit(round_number)
        self._write_metrics()
        self.on_round(record)
        return global_state

    def _final(self, global_state: State) -> None:
        started = time.perf_counter()
        final_round = self.config.federation.rounds + 1
        clients = {}
        for client in self.setting.clients:
            task = ClientTask(client.client_id, final_round, train=False, evaluate=True, union=True, probes=True)
            entry, _ = self._exchange(task, global_state)
            clients[client.client_id] = {
                "status": entry["status"],
                "error": entry["error"],
                "own": entry.get("eval"),
                "union": entry.get("union"),
                "probes": entry.get("probes"),
            }
        self._write_record("final", {"kind": "final", "clients": clients, "seconds": time.perf_counter() - started})


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
    runtime = InProcessRuntime(config, target, setting=setting, on_round=on_round)
    return RunResult(target, runtime.run())

"""Cheap runs on the micro model for the run-directory and resume fault suites, and a file-tree fingerprint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedexperts.config import ExperimentConfig, load_config
from fedexperts.federation.inprocess import run_experiment

CHEAP = ("eval.every=0", "eval.union_examples=0", "eval.probes=0", "eval.max_examples=2")
"""No per-round evaluation and a tiny final one: a round costs about a second on two cores."""


VOLATILE = {"seconds", "peak_memory_bytes", "bytes_up"}


def stable(value: Any) -> Any:
    """A record without wall times and memory figures, which differ between identical runs.

    Uplink bytes go too: the reply's metadata carries the client's timings, whose decimal length varies.
    """
    if isinstance(value, dict):
        return {key: stable(item) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    return load_file(checkpoints[-1])


def assert_same_run(a: Path, b: Path) -> None:
    """Same records (wall times aside) and bit-identical final global state."""
    lines = [[stable(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    assert lines[0][1:] == lines[1][1:]
    left, right = final_state(a), final_state(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0)


class Interrupt(BaseException):
    """Stands for a kill: not an ``Exception``, so the runtime does not treat it as a client failure."""


def cheap_config(model_path: Path, output_dir: Path, *overrides: str) -> ExperimentConfig:
    from tests.conftest import MICRO_RUN

    model = f'model.name="{model_path}"'
    return load_config(None, [model, f'output_dir="{output_dir}"', *MICRO_RUN, *CHEAP, *overrides])


def stopped_after(config: ExperimentConfig, run_dir: Path, round_number: int) -> Path:
    """Run ``config`` into ``run_dir`` and stop it (as a kill would) once ``round_number`` is committed."""

    def stop(record: dict) -> None:
        if record["round"] == round_number:
            raise Interrupt

    try:
        run_experiment(config, run_dir, on_round=stop)
    except Interrupt:
        return run_dir
    raise AssertionError(f"the run ended before round {round_number}")


def copy_run(template: Path, target: Path) -> Path:
    shutil.copytree(template, target, symlinks=True)
    return target


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by sha256, folders and links by kind."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[name] = f"link to {path.readlink()}"
        elif path.is_dir():
            found[name] = "folder"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def audited_round(run_dir: Path, round_number: int) -> tuple[dict[str, tuple[dict[str, torch.Tensor], int]], dict]:
    """A round's audit: ``({client: (update tensors, weight)}, new global state)``, read with safetensors alone."""
    from safetensors import safe_open

    folder = run_dir / "audit" / f"round-{round_number:06d}"
    updates = {}
    for path in sorted(folder.glob("client-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            examples = json.loads(handle.metadata()["fedexperts"])["examples"]
        updates[path.stem] = (load_file(path), examples)
    return updates, load_file(folder / "global.safetensors")


def weighted_mean(updates: dict[str, tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg's aggregate written out independently: sum of weight x tensor over sum of weights, in float64."""
    total = sum(weight for _tensors, weight in updates.values())
    keys = next(iter(updates.values()))[0].keys()
    return {key: sum(t[key].double() * (w / total) for t, w in updates.values()) for key in keys}


def accepted(record: dict) -> set[str]:
    return {client for client, entry in record["clients"].items() if entry["status"] == "ok"}


def assert_aggregates_are_accepted_means(run_dir: Path, round_records: list[dict]) -> None:
    """Each round's audited global state is the weighted mean of exactly the updates that round accepted."""
    for record in round_records:
        updates, global_state = audited_round(run_dir, record["round"])
        assert set(updates) == accepted(record), record["round"]
        for key, value in weighted_mean(updates).items():
            torch.testing.assert_close(global_state[key].double(), value, rtol=0, atol=1e-7)

"""Hand-written metrics.jsonl records, valid by default, so each test states only what it checks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG = '[model]\nname = "builtin"\n\n[algorithm]\nname = "fedavg"\n'


def scores(
    rouge_l: float = 0.5, exact_match: float = 0.25, loss: float = 1.0, examples: int = 10, **later: float
) -> dict[str, Any]:
    """``later``: the optional fields (``rouge_1``, ``token_f1``...) that older runs lack."""
    return {"loss": loss, "exact_match": exact_match, "rouge_l": rouge_l, "examples": examples, **later}


def run_line(
    clients: Sequence[str] = ("0", "1", "2"), rounds: int = 3, seed: int = 0, name: str = "demo", **extra: Any
) -> dict[str, Any]:
    line = {
        "kind": "run",
        "name": name,
        "algorithm": "fedavg",
        "seed": seed,
        "clients": list(clients),
        "rounds": rounds,
        "model": "builtin",
        "parameters": {"total": 1000, "trainable": 100, "shared": 60, "personal": 40, "frozen": 900},
    }
    return {**line, **extra}


def client_round(
    status: str = "ok",
    evaluation: dict[str, Any] | None = None,
    *,
    error: str | None = None,
    bytes_down: int = 100,
    bytes_up: int = 50,
    peak_memory_bytes: int = 1_000,
    train_loss: float | None = 0.9,
) -> dict[str, Any]:
    return {
        "status": status,
        "error": error,
        "examples": 8,
        "train_loss": train_loss,
        "eval": evaluation,
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
        "peak_memory_bytes": peak_memory_bytes,
        "seconds": {"train": 1.0, "eval": 0.5, "total": 1.5},
    }


def round_line(
    number: int,
    clients: Mapping[str, dict[str, Any]],
    *,
    sampled: Sequence[str] | None = None,
    seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A round whose byte totals are the sums over its clients."""
    return {
        "kind": "round",
        "round": number,
        "sampled": list(clients if sampled is None else sampled),
        "clients": dict(clients),
        "bytes_down": sum(part.get("bytes_down", 0) for part in clients.values()),
        "bytes_up": sum(part.get("bytes_up", 0) for part in clients.values()),
        "seconds": dict(seconds or {"round": 10.0, "train": 6.0, "eval": 2.0, "aggregate": 1.0, "overhead": 1.0}),
    }


def client_final(
    own: dict[str, Any] | None = None, union: dict[str, Any] | None = None, probes: float | None = None
) -> dict[str, Any]:
    return {"own": own or scores(), "union": union, "probes": probes}


def final_line(clients: Mapping[str, dict[str, Any]], seconds: float = 4.0) -> dict[str, Any]:
    return {"kind": "final", "clients": dict(clients), "seconds": seconds}


def write_run(directory: Path, lines: Sequence[dict[str, Any] | str], config: str | None = CONFIG) -> Path:
    """Write a run directory; strings in ``lines`` are written verbatim (for broken lines)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (directory / "metrics.jsonl").write_text(text)
    if config is not None:
        (directory / "config.toml").write_text(config)
    return directory


def simple_run(
    directory: Path,
    *,
    seed: int = 0,
    own_rouge_l: Sequence[float] = (0.4, 0.5, 0.6),
    curve: Sequence[float] = (0.2, 0.5, 0.6),
    probes: float | None = 0.5,
    bytes_down: int = 100,
    finished: bool = True,
    later: Mapping[str, float] | None = None,
) -> Path:
    """Three clients, one round per value of ``curve`` (every client evaluated at that ROUGE-L).

    ``later``: optional score fields every final own evaluation carries (none: an older run's record).
    """
    clients = [str(index) for index in range(len(own_rouge_l))]
    lines: list[dict[str, Any]] = [run_line(clients, rounds=len(curve), seed=seed)]
    for number, value in enumerate(curve, start=1):
        parts = {client: client_round(evaluation=scores(rouge_l=value), bytes_down=bytes_down) for client in clients}
        lines.append(round_line(number, parts))
    if finished:
        finals = {
            client: client_final(
                own=scores(rouge_l=value, **(later or {})), union=scores(rouge_l=value / 2), probes=probes
            )
            for client, value in zip(clients, own_rouge_l, strict=True)
        }
        lines.append(final_line(finals))
    return write_run(directory, lines)

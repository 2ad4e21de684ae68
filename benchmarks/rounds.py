"""Round overhead: a round's wall time minus the clients' own work, in-process and on Flower simulation.

The same FedAvg config (built-in model, 2 rounds, every client sampled, no per-round evaluation)
runs with 8 and 64 clients on each runtime, with 2 local steps per round (the worst case for
overhead) and, in-process, also with the default 10. A client's own work is what
it reports: building its model from the received tensors is not included, training and
evaluation are, and on Flower also ``seconds_setup`` (building its setting in the worker). In
process, clients run one after another, so overhead = wall − Σ work. Flower's simulation runs
``workers`` clients at a time (one Ray actor per core), so its overhead is wall − Σ work / workers:
what the round costs beyond perfectly parallel client work.

    python -m benchmarks.rounds                                # 8 and 64 clients (make bench)
    python -m benchmarks.rounds --clients 64 --no-default-steps # the 2-step comparison only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import NO_EVALUATION, Table
from fedexperts.config import TrainConfig, load_config
from fedexperts.federation.inprocess import run_experiment

DEFAULT_STEPS = TrainConfig().steps_per_round
"""The default round (10 local steps); 2 steps is the worst case for overhead."""
RUN = (
    "algorithm.name=fedavg",
    "data.scheme=iid",
    "federation.rounds=2",
    "train.steps_per_round=2",
    *NO_EVALUATION,
)


def _work(entry: dict[str, Any]) -> float:
    seconds = entry["seconds"]
    return float(seconds.get("setup", 0.0) + seconds["train"] + seconds["eval"])


def overhead(records: list[dict[str, Any]], workers: int) -> tuple[float, float, float]:
    """Median over rounds of (wall seconds, Σ client work seconds, overhead fraction of the wall)."""
    walls, works, fractions = [], [], []
    for record in records:
        if record["kind"] != "round":
            continue
        wall = record["seconds"]["round"]
        work = sum(_work(entry) for entry in record["clients"].values())
        walls.append(wall)
        works.append(work)
        fractions.append(max(wall - work / workers, 0.0) / wall)
    return statistics.median(walls), statistics.median(works), statistics.median(fractions)


def run(clients: tuple[int, ...] = (8, 64), *, with_default_steps: bool = True) -> Table:
    from fedexperts.federation.flower import run_simulation

    workers = os.cpu_count() or 1
    table = Table(
        "Round overhead (FedAvg, built-in model; median over 2 rounds)",
        ["runtime", "clients", "local steps", "round wall (s)", "Σ client work (s)", "overhead", "whole run (s)"],
    )
    with tempfile.TemporaryDirectory() as folder:
        for count in clients:
            config = load_config(
                None,
                [
                    *RUN,
                    f"federation.clients={count}",
                    f"federation.min_clients={count}",
                    f"data.items={max(1200, 20 * count)}",
                    f'output_dir="{folder}"',
                ],
            )
            default_steps = config.model_copy(
                update={"train": config.train.model_copy(update={"steps_per_round": DEFAULT_STEPS})}
            )
            runs = [("in-process", 2), ("in-process", DEFAULT_STEPS), ("Flower simulation", 2)]
            for runtime, steps in runs if with_default_steps else runs[::2]:
                start = time.perf_counter()
                target = Path(folder) / f"{runtime.split()[0]}-{count}-{steps}"
                if runtime == "in-process":
                    run_config = config if steps == 2 else default_steps
                    records, parallel = run_experiment(run_config, target).records, 1
                else:
                    records, parallel = run_simulation(config, target).records, workers
                total = time.perf_counter() - start
                wall, work, fraction = overhead(records, parallel)
                table.add(runtime, count, steps, f"{wall:.1f}", f"{work:.1f}", f"{100 * fraction:.1f}%", f"{total:.0f}")
    table.note(
        f"Flower simulation runs {workers} clients at a time (one Ray actor per core); its overhead is "
        "wall - work / workers. The whole-run time includes loading, Flower/Ray start-up and the final evaluation."
    )
    table.note(
        "in-process overhead is the server loop plus each client's model build from the received tensors, "
        "the encoding and decoding of every message, validation, the per-round checkpoint and records. "
        "On Flower the simulation fills the node cache before Ray starts (the base model and every client's "
        "tokens, built once as in-process builds them; part of the whole run); each actor memory-maps the "
        "cached model, reads a client's tokens the first time it serves it (seconds_setup), keeps both "
        "between messages and runs cpus-per-client torch threads"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--no-default-steps", action="store_true", help="skip the in-process run of 10 local steps")
    args = parser.parse_args()
    print(run(tuple(args.clients), with_default_steps=not args.no_default_steps).markdown())


if __name__ == "__main__":
    main()

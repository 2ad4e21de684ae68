"""Scale: 10, 100 and 1,000 clients, a tenth of them sampled per round, in-process on the micro model.

What must hold: the server's memory does not grow with the number of clients (their personal
states live on disk, a round's record names only the sampled ones), and a round's time grows
linearly with the clients sampled in it. The process also holds every client's tokenized data
(an in-process simulation's cost, not the server's): it is reported apart, as the RSS after setup.
The final evaluation of every client is skipped here; it is per-client work, linear by construction.

    python -m benchmarks.scale
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import Table
from fedexperts.config import load_config
from fedexperts.experiment import build_setting
from fedexperts.federation.inprocess import InProcessTransport, members_of
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.federation.server import Federation
from fedexperts.federation.state import ClientStateStore
from fedexperts.models.builtin import RECIPES, is_built, model_path, pretrain

RUN = (
    "algorithm.name=flex",
    "data.scheme=iid",
    "data.max_length=64",
    "data.test_fraction=0.34",
    "federation.fraction=0.1",
    "federation.rounds=3",
    "train.steps_per_round=1",
    "train.batch_size=2",
    "eval.every=0",
    "eval.max_examples=1",
    "eval.union_examples=0",
    "eval.probes=0",
)


class _RoundsOnly(Federation):
    def _final(self, global_state: object) -> None:  # type: ignore[override]
        """Skipped: scoring all N clients is per-client work, not what this benchmark measures."""


def micro_model() -> Path:
    path = model_path(RECIPES["micro"])
    if not is_built(path, RECIPES["micro"]):
        pretrain(RECIPES["micro"], path, progress=False)
    return path


def measure(clients: int, folder: Path, model: Path) -> dict[str, float]:
    config = load_config(
        None,
        [
            *RUN,
            f'model.name="{model}"',
            f"federation.clients={clients}",
            f"data.items={6 * clients}",
            f'output_dir="{folder}"',
        ],
    )
    setting = build_setting(config)
    run_dir = folder / f"clients-{clients}"
    prepare_run_dir(config, run_dir, resume=False)
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rounds: list[float] = []
    federation = _RoundsOnly(
        config,
        run_dir,
        algorithm=setting.algorithm,
        model=setting.model,
        members=members_of(setting),
        transport=InProcessTransport(setting, ClientStateStore(run_dir / "clients")),
        on_round=lambda record: rounds.append(record["seconds"]["round"]),
    )
    start = time.perf_counter()
    federation.run()
    stop.set()
    sampler.join()
    sampled = max(1, round(0.1 * clients))
    return {
        "setup_rss": baseline / 2**20,
        "growth": (peak[0] - baseline) / 2**20,
        "round": statistics.median(rounds),
        "per_client": statistics.median(rounds) / sampled,
        "sampled": sampled,
        "wall": time.perf_counter() - start,
    }


def run(sizes: tuple[int, ...] = (10, 100, 1000)) -> Table:
    model = micro_model()
    table = Table(
        "Scale: FLEx, micro model, 10% of clients sampled per round, 3 rounds (in-process)",
        [
            "clients",
            "sampled per round",
            "round (s, median)",
            "per sampled client (s)",
            "RSS growth during the rounds",
            "RSS after setup (data of all clients)",
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        for clients in sizes:
            result = measure(clients, Path(folder), model)
            table.add(
                clients,
                result["sampled"],
                f"{result['round']:.2f}",
                f"{result['per_client']:.3f}",
                f"{result['growth']:.0f} MiB",
                f"{result['setup_rss']:.0f} MiB",
            )
    table.note("RSS growth = peak resident memory during the rounds minus the resident memory before them")
    return table


def main() -> None:
    print(run().markdown())


if __name__ == "__main__":
    main()

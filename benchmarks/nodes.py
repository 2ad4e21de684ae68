"""A Flower deployment's per-message setup, with and without the node cache, on 127.0.0.1.

Flower starts a fresh ClientApp process for every message (flwr issue #3670). Each process builds
its client's setting: without the cache it loads the base model with ``from_pretrained``, generates
the whole federation's rows and tokenizes its partition; with it (the default) it memory-maps the
cached model and reads its tokenized partition. The same FedAvg run (built-in model, 2 SuperNodes,
3 rounds of 2 local steps, TLS and SuperNode auth) runs once each way, on a fresh deployment. Per
message: ``seconds.setup`` (building the setting, reported by the ClientApp), the client's own
training and evaluation, and the message's whole exchange as the server saw it (``seconds.total``:
the rest is Flower's polling, the process start and its imports). With the cache, the membership
query before round 1 is the first process on each node and fills the cache (a miss); every train
message after it is a hit.

    python -m benchmarks.nodes
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import NO_EVALUATION, Table
from fedexperts.config import load_config
from fedexperts.federation.flower.app_dir import write_app
from fedexperts.federation.flower.deployment import LocalDeployment

NODES = 2
RUN = (
    "algorithm.name=fedavg",
    "data.scheme=iid",
    "federation.rounds=3",
    f"federation.clients={NODES}",
    f"federation.min_clients={NODES}",
    "train.steps_per_round=2",
    *NO_EVALUATION,
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def deployment_run(folder: Path, node_cache: bool) -> dict[str, Any]:
    """One run on a fresh deployment: per-message medians and the whole run's seconds."""
    name = "cached" if node_cache else "uncached"
    config = load_config(None, [*RUN, f'output_dir="{folder / "runs"}"', f'name="{name}"'])
    app = folder / f"app-{name}"
    write_app(config, app)
    with LocalDeployment(folder / f"deployment-{name}", nodes=NODES, node_cache=node_cache) as deployment:
        start = time.perf_counter()
        status, details = deployment.wait(deployment.run(app))
        whole = time.perf_counter() - start
    if status != "finished:completed":
        raise SystemExit(f"the {name} deployment run ended {status}: {details}")
    lines = (config.output_dir / name / "metrics.jsonl").read_text().splitlines()
    rounds = [record for record in map(json.loads, lines) if record["kind"] == "round"]
    entries = [entry["seconds"] for record in rounds for entry in record["clients"].values()]
    setup = [entry["setup"] for entry in entries]
    total = [entry["total"] for entry in entries]
    return {
        "setup": _median(setup),
        "work": _median([entry["train"] + entry["eval"] for entry in entries]),
        "total": _median(total),
        "share": _median([s / t for s, t in zip(setup, total, strict=True)]),
        "round": _median([record["seconds"]["round"] for record in rounds]),
        "whole": whole,
    }


def run() -> Table:
    table = Table(
        f"Flower deployment on 127.0.0.1: setup per message (FedAvg, built-in model, {NODES} SuperNodes, 3 rounds)",
        [
            "node cache",
            "setup per message (s)",
            "train + eval (s)",
            "message wall (s)",
            "setup share",
            "round wall (s)",
            "whole run (s)",
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        for node_cache in (False, True):
            got = deployment_run(Path(folder), node_cache)
            table.add(
                "on" if node_cache else "off",
                f"{got['setup']:.2f}",
                f"{got['work']:.2f}",
                f"{got['total']:.1f}",
                f"{100 * got['share']:.1f}%",
                f"{got['round']:.1f}",
                f"{got['whole']:.0f}",
            )
    table.note(
        "medians over every client message of the 3 rounds; setup is seconds.setup (building the client's setting "
        "in the ClientApp process), the message wall is seconds.total (the exchange as the server saw it)"
    )
    table.note(
        "the rest of a message's wall is Flower's: polling for the message and the reply, and a fresh "
        "flwr-clientapp process starting and importing torch, transformers and fedexperts (flwr issue #3670)"
    )
    table.note("whole run: from `flwr run` to finished:completed, deployment start-up excluded")
    return table


def main() -> None:
    print(run().markdown())


if __name__ == "__main__":
    main()

"""Half-precision transfer: bytes saved and the effect on scores, over seeds.

FLEx on the built-in model (the default experiment, shorter evaluation) with the updates and
downlinks sent as they are (float32), as float16 and as bfloat16 (``federation.transfer_dtype``),
three federation seeds each, in-process. Scores are the final personalized ROUGE-L and loss
averaged over clients; the interval is the 95% Student t over seeds.

    python -m benchmarks.transfer
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Table
from fedexperts.config import load_config
from fedexperts.federation.inprocess import run_experiment
from fedexperts.reporting.compare import Estimate, estimate

RUN = ("algorithm.name=flex", "eval.max_examples=16", "eval.union_examples=0", "eval.probes=0")


def _scores(records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(personalized ROUGE-L, personalized loss, bytes per client per round) of one run."""
    final = next(record for record in records if record["kind"] == "final")["clients"].values()
    rouge = statistics.mean(entry["own"]["rouge_l"] for entry in final)
    loss = statistics.mean(entry["own"]["loss"] for entry in final)
    rounds = [record for record in records if record["kind"] == "round"]
    sizes = [e["bytes_down"] + e["bytes_up"] for record in rounds for e in record["clients"].values()]
    return rouge, loss, statistics.mean(sizes)


def run(seeds: tuple[int, ...] = (0, 1, 2)) -> Table:
    table = Table(
        "Half-precision transfer (FLEx, built-in model, 5 clients x 3 rounds; mean ± 95% CI over seeds)",
        ["on the wire", "bytes per client per round", "personalized ROUGE-L", "personalized loss"],
    )
    with tempfile.TemporaryDirectory() as folder:
        for dtype in (None, "float16", "bfloat16"):
            results = []
            for seed in seeds:
                overrides = [*RUN, f"federation.seed={seed}", f'output_dir="{folder}"']
                if dtype is not None:
                    overrides.append(f'federation.transfer_dtype="{dtype}"')
                target = Path(folder) / f"{dtype}-{seed}"
                results.append(_scores(run_experiment(load_config(None, overrides), target).records))
            rouge = estimate([r[0] for r in results])
            loss = estimate([r[1] for r in results])
            size = statistics.mean(r[2] for r in results)
            table.add(dtype or "float32 (as stored)", f"{size / 1024:,.1f} KiB", _fmt(rouge), _fmt(loss))
    table.note("the server keeps its global state in float32; receivers restore each tensor's dtype")
    return table


def _fmt(value: Estimate) -> str:
    return f"{value.mean:.4f}" + (f" ± {value.ci:.4f}" if value.ci is not None else "")


def main() -> None:
    print(run().markdown())


if __name__ == "__main__":
    main()

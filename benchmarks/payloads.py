"""Bytes per client per round for every algorithm, on both wires, against the raw tensor bytes.

Each algorithm runs a short real federation on the built-in model (5 clients, 2 rounds of one
step, no evaluation) through the in-process runtime, with a transport that also encodes every
message the other ways: as a Flower record (what the Flower runtime sends), and as safetensors
with floating tensors cast to float16 (an opt-in half-precision transfer). FedMoE's second
round is its stage 2, where each client receives only the experts it holds.

    python -m benchmarks.payloads
"""

from __future__ import annotations

import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import Table
from fedexperts.config import load_config
from fedexperts.experiment import build_setting
from fedexperts.federation.client import ClientTask
from fedexperts.federation.flower.wire import payload_to_record, record_bytes
from fedexperts.federation.inprocess import InProcessTransport, members_of
from fedexperts.federation.payload import encode
from fedexperts.federation.rundir import prepare_run_dir
from fedexperts.federation.server import Delivery, Federation
from fedexperts.federation.state import ClientStateStore
from fedexperts.interface import Payload

ALGORITHMS = (
    "local",
    "fedavg",
    "dense",
    "flex",
    "random-expert",
    "fedmoe",
    "random-moe",
    "fedsa-lora",
    "ffa-lora",
    "feddpa",
)
RUN = (
    "federation.clients=5",
    "federation.rounds=2",
    "train.steps_per_round=1",
    "eval.every=0",
    "eval.max_examples=1",
    "eval.union_examples=0",
    "eval.probes=0",
    "eval.max_new_tokens=1",
)


class MeasuringTransport(InProcessTransport):
    """The in-process transport, also sizing every message on the other wires."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sizes: dict[str, list[int]] = defaultdict(list)
        self.round = 0

    def _size(self, direction: str, payload: Payload) -> None:
        self.sizes[f"{direction} raw"].append(payload.tensor_bytes)
        self.sizes[f"{direction} safetensors"].append(len(encode(payload)))
        self.sizes[f"{direction} flower"].append(record_bytes(payload_to_record(payload)))
        self.sizes[f"{direction} fp16"].append(len(encode(payload, dtype=torch.float16)))

    def exchange(self, tasks: Sequence[tuple[ClientTask, Payload]]) -> dict[str, Delivery]:
        deliveries = super().exchange(tasks)
        final = any(not task.train for task, _ in tasks)
        if not final and tasks[0][0].round == 2:  # the last training round (FedMoE: stage 2)
            for task, downlink in tasks:
                self._size("down", downlink)
                reply = deliveries[task.client_id].reply
                if reply is not None:
                    self._size("up", Payload(reply.tensors))
        return deliveries


def measure(algorithm: str, folder: Path) -> dict[str, float]:
    config = load_config(None, [f"algorithm.name={algorithm}", *RUN])
    setting = build_setting(config)
    run_dir = folder / algorithm
    prepare_run_dir(config, run_dir, resume=False)
    transport = MeasuringTransport(setting, ClientStateStore(run_dir / "clients"))
    Federation(
        config,
        run_dir,
        algorithm=setting.algorithm,
        model=setting.model,
        members=members_of(setting),
        transport=transport,
    ).run()
    return {key: statistics.median(values) for key, values in transport.sizes.items()}


def _size(count: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,.0f} B"


def run() -> Table:
    table = Table(
        "Bytes per client per round, built-in model (median over clients, last training round)",
        [
            "algorithm",
            "down: raw tensors",
            "down: safetensors",
            "down: Flower",
            "up: raw tensors",
            "up: safetensors",
            "up: Flower",
            "up: fp16 safetensors",
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        for algorithm in ALGORITHMS:
            sizes = measure(algorithm, Path(folder))
            table.add(
                algorithm,
                *(_size(sizes[f"down {wire}"]) for wire in ("raw", "safetensors", "flower")),
                *(_size(sizes[f"up {wire}"]) for wire in ("raw", "safetensors", "flower", "fp16")),
            )
    table.note(
        "raw = the tensors' own bytes; safetensors = the in-process wire (tensors + a JSON header with "
        "metadata); Flower = Flower's count of the records the Flower runtime sends (.npy headers per tensor)"
    )
    table.note("local sends nothing but metadata (its example count and metrics)")
    return table


def main() -> None:
    print(run().markdown())


if __name__ == "__main__":
    main()

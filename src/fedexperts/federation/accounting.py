"""Measuring what a client step costs: peak memory while it runs, and wall time per phase.

Peak memory on CUDA is torch's own allocator peak. On CPU, torch offers no allocator statistics,
so a background thread samples the process's resident set size (psutil) every few milliseconds;
the figure is the process peak during the step (base model included), which is what a client
machine must hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn


@dataclass
class PeakMeter:
    """The running peak of one :func:`peak_memory` block, updated while it runs.

    A measurement holder, not a record: the client reports its ``bytes`` as ``peak_memory_bytes``,
    and the run's reported peak is :class:`fedexperts.reporting.runs.PeakMemory`.
    """

    bytes: int = 0
    device: str = "cpu"


@contextmanager
def peak_memory(device: torch.device | str = "cpu", *, interval: float = 0.005) -> Iterator[PeakMeter]:
    """Track the peak memory of the block: CUDA allocator peak on a GPU, process RSS peak on CPU."""
    device = torch.device(device)
    result = PeakMeter(device=device.type)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.bytes = int(torch.cuda.max_memory_allocated(device))
        return
    process = psutil.Process()
    stop = threading.Event()

    def sample() -> None:
        while True:
            result.bytes = max(result.bytes, int(process.memory_info().rss))
            if stop.wait(interval):
                return

    sampler = threading.Thread(target=sample, name="fedexperts-peak-memory", daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.bytes = max(result.bytes, int(process.memory_info().rss))


def held_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers: the weights it holds.

    A tensor shared with another model (a FedMoE view over the shared base) or tied to another
    (embeddings) is counted once, with its whole storage, whatever part of it is used; a tensor on
    the meta device holds nothing.
    """
    storages: dict[tuple[str, int], int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        storages[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@dataclass
class Stopwatch:
    """Seconds spent per named phase; phases may repeat and accumulate."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

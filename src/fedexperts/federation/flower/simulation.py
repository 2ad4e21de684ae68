"""Flower's simulation runtime (Ray) from Python: one SuperNode per client, on this machine.

``flwr.simulation.run_simulation`` runs the ServerApp in a thread of this process and each
ClientApp in a Ray actor; it gives the apps no run config, so the config travels in the app
factories instead. The node states go under ``run_dir/nodes`` unless told otherwise. Before Ray
starts, this process fills the node cache (:mod:`~fedexperts.federation.flower.nodecache`) with the
base model and every client's tokenized partition, so each actor memory-maps the one model file
and reads its clients' tokens instead of building them; an actor runs ``cpus_per_client`` torch
threads (at least one). A run that completes no round (a failed start) is removed once the nodes
have stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedexperts.config import ExperimentConfig
from fedexperts.errors import FedExpertsError, RunError
from fedexperts.federation.flower.clientapp import client_app, default_cache_dir
from fedexperts.federation.flower.nodecache import NodeCache, warm
from fedexperts.federation.flower.serverapp import server_app
from fedexperts.federation.rundir import RunResult, discard_unstarted
from fedexperts.federation.runstore import NODES
from fedexperts.reporting.schema import METRICS_FILE


def run_simulation(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    state_dir: Path | None = None,
    cache_dir: Path | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``config`` on Flower's simulation engine and return the run directory's records.

    ``gpus_per_client`` defaults to 1 / (clients that fit) when CUDA is present, else 0. The CPUs are
    checked before Ray starts: Ray refuses a bad count with pages of log, or waits forever for cores
    that are not there. ``resume`` continues the run in ``run_dir`` after its last committed round.
    ``cache_dir`` is the node cache (default ``$FEDEXPERTS_CACHE/node-cache``).
    """
    from flwr.simulation import run_simulation as flower_simulation

    cpus = os.cpu_count() or 1
    if not 0 < cpus_per_client <= cpus:
        raise FedExpertsError(
            f"cpus per client (--cpus-per-client) must be above 0 and at most the {cpus} cores here, "
            f"got {cpus_per_client:g}"
        )
    if gpus_per_client is None:
        gpus_per_client = 1.0 / max(1, int(cpus // cpus_per_client)) if torch.cuda.is_available() else 0.0
    cache = NodeCache(cache_dir or default_cache_dir())
    warm(config, cache, range(config.federation.clients))  # before any run file: bad data fails here
    server = server_app(
        config, run_dir, resume=resume, overwrite=overwrite, discard_failed_start=False, on_round=on_round
    )
    threads = max(1, int(cpus_per_client))
    client = client_app(config, state_dir or run_dir / NODES, cache_dir=cache.root, threads=threads)
    try:
        flower_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=config.federation.clients,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
                "init_args": {"num_cpus": cpus, "num_gpus": torch.cuda.device_count(), "logging_level": logging.ERROR},
            },
        )
    finally:  # the nodes have stopped: a run that completed no round (a failed start) goes
        discard_unstarted(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        raise RunError(f"the Flower simulation wrote no {METRICS_FILE} to {run_dir}; see the log above")
    return RunResult(run_dir, [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])

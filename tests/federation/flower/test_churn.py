"""Churn soak (``make soak``): 8 SuperNodes on 127.0.0.1, a seeded 30% SIGKILLed during every round.

Killed nodes are started again once the SuperLink has marked them offline (two missed heartbeats,
about a minute in flwr 1.41), so several are down at any time. The run must complete; each round's
aggregate must be the weighted mean of exactly the replies the round accepted (recomputed here
from the round's audit, ``federation.audit``); every node's committed personal state must be the
one of its client's last accepted round (or that round's state still staged, when no message reached
the node after it), readable and finite. The figures are printed (``make soak`` shows them) for
docs/flower.md. The suite's small case is ``test_deployment``'s one killed SuperNode.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedexperts.federation.flower.app_dir import write_app
from fedexperts.federation.flower.deployment import LocalDeployment
from fedexperts.federation.state import ClientStateStore
from fedexperts.runfiles import RunManifest
from tests.federation.helpers import accepted, assert_aggregates_are_accepted_means, audited_round

NODES, ROUNDS, KILLED_SHARE, SEED = 8, 10, 0.3, 0
BOUND_SECONDS = 45 * 60
"""The whole soak's bound: each round waits about a minute for its dead nodes to be reported offline."""

pytestmark = [pytest.mark.soak, pytest.mark.usefixtures("no_leftover_processes")]


def _round_started(run_dir: Path, round_number: int) -> bool:
    """Round ``r`` starts once round ``r - 1`` is recorded (round 1: once the run record is written)."""
    name = "run" if round_number == 1 else f"round-{round_number - 1:06d}"
    return (run_dir / "records" / f"{name}.json").exists()


def _round_done(run_dir: Path, round_number: int) -> bool:
    return (run_dir / "records" / f"round-{round_number:06d}.json").exists()


def _churn(deployment: LocalDeployment, run_id: int, run_dir: Path) -> dict:
    """Kill a seeded share of the running nodes a seeded moment into each round; restart the offline ones."""
    rng = random.Random(SEED)
    per_round = math.ceil(KILLED_SHARE * NODES)  # at least the share: 3 of 8
    killed: dict[int, list[int]] = {}
    down: dict[int, float] = {}  # partition -> when it was killed
    restarted: dict[int, tuple[float, float]] = {}  # partition -> (killed, started again), until seen online
    downtimes: list[tuple[float, float]] = []  # (killed to online, started again to online)
    next_round, started_at, delay, status = 1, None, 0.0, ""
    deadline = time.monotonic() + BOUND_SECONDS
    while time.monotonic() < deadline:
        if next_round <= ROUNDS and _round_started(run_dir, next_round):
            if started_at is None:
                started_at, delay = time.monotonic(), rng.uniform(0.5, 3.0)
            if _round_done(run_dir, next_round):
                pytest.fail(f"round {next_round} ended before its nodes could be killed")
            if time.monotonic() - started_at >= delay:
                running = [p for p in range(NODES) if deployment.running(p)]
                chosen = sorted(rng.sample(running, min(per_round, len(running))))
                for partition in chosen:
                    deployment.kill_node(partition)
                    down[partition] = time.monotonic()
                killed[next_round], next_round, started_at = chosen, next_round + 1, None
        if down:
            for partition in deployment.restart_offline(sorted(down)):
                restarted[partition] = (down.pop(partition), time.monotonic())
        if restarted:
            statuses = deployment.statuses()
            for partition in [p for p in restarted if statuses.get(deployment.node_id(p)) == "online"]:
                killed_at, started_again = restarted.pop(partition)
                downtimes.append((time.monotonic() - killed_at, time.monotonic() - started_again))
        if next_round > ROUNDS and (run_dir / "records" / "final.json").exists():
            status, details = deployment.status(run_id)
            if status.startswith("finished:"):
                assert status == "finished:completed", details
                break
        time.sleep(1.0)
    else:
        pytest.fail(f"the churn soak did not finish within {BOUND_SECONDS} s (run status {status!r})")
    return {"killed": killed, "downtimes": downtimes}


def _check_node_states(deployment: LocalDeployment, run_dir: Path, rounds: dict[int, dict]) -> None:
    """Each client's committed state is its last accepted round's (or that round is staged, awaiting a commit)."""
    uid = RunManifest.load(run_dir).uid
    for partition in range(NODES):
        client = f"client-{partition}"
        folder = deployment.state_dir(partition) / f"run-{uid}" / f"partition-{partition}"
        for path in folder.rglob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(path).values()), path  # readable, finite
        taken = sorted(r for r, record in rounds.items() if client in accepted(record))
        committed = ClientStateStore(folder).round_of(client)
        if not taken:
            assert committed is None, client
            continue
        staged = (folder / ".staging" / f"round-{taken[-1]:06d}" / f"{client}.safetensors").exists()
        earlier = taken[-2] if len(taken) > 1 else None
        assert committed == taken[-1] or (staged and committed == earlier), (client, committed, taken, staged)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _figures(rounds: dict[int, dict], final: dict, churn: dict, wall: float) -> str:
    lines = ["| round | killed | accepted | failed | round wall (s) |", "|---|---|---|---|---|"]
    for number, record in sorted(rounds.items()):
        failed = len(record["sampled"]) - len(accepted(record))
        killed = ", ".join(str(p) for p in churn["killed"].get(number, [])) or "-"
        lines.append(f"| {number} | {killed} | {len(accepted(record))} | {failed} | {record['seconds']['round']:.1f} |")
    downtimes = churn["downtimes"]
    evaluated = sum(entry["status"] == "ok" for entry in final["clients"].values())
    lines.append(
        f"\nwhole run {wall:.0f} s; {sum(map(len, churn['killed'].values()))} kills; "
        f"killed to online again: median {_median([d[0] for d in downtimes]):.1f} s, "
        f"of which started again to online {_median([d[1] for d in downtimes]):.1f} s, over {len(downtimes)} "
        f"restarts; final evaluation reached {evaluated} of {NODES} clients"
    )
    return "\n".join(lines)


def test_eight_supernodes_survive_a_seeded_30_percent_killed_every_round(micro_config, tmp_path):
    config = micro_config(
        "algorithm.name=flex",
        f"federation.clients={NODES}",
        f"federation.min_clients={NODES}",
        "federation.min_successful=1",
        f"federation.rounds={ROUNDS}",
        "federation.reply_timeout=300",
        "federation.audit=true",
        "eval.every=0",
    )
    app = tmp_path / "app"
    write_app(config, app)
    run_dir = config.output_dir / config.name
    started = time.monotonic()
    with LocalDeployment(tmp_path / "deployment", nodes=NODES) as deployment:
        churn = _churn(deployment, deployment.run(app), run_dir)
        wall = time.monotonic() - started
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = {line["round"]: line for line in lines if line["kind"] == "round"}
        assert sorted(rounds) == list(range(1, ROUNDS + 1))
        assert all(churn["killed"].get(r) for r in rounds), churn["killed"]
        assert_aggregates_are_accepted_means(run_dir, [rounds[number] for number in sorted(rounds)])
        final = load_file(sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1])
        last = audited_round(run_dir, ROUNDS)[1]
        assert all(torch.equal(final[f"global/{key}"], value) for key, value in last.items())
        _check_node_states(deployment, run_dir, rounds)
    print(f"\nchurn soak: {NODES} SuperNodes, {ROUNDS} rounds, {KILLED_SHARE:.0%} killed per round\n")
    print(_figures(rounds, next(line for line in lines if line["kind"] == "final"), churn, wall))

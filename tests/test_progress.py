"""The run's progress display: plain lines off a terminal, live bars with ETA on one."""

from __future__ import annotations

import io

from rich.console import Console

from fedexperts.federation.client import ClientTask
from fedexperts.federation.inprocess import ClientEvent
from fedexperts.federation.server import Delivery
from fedexperts.progress import RunProgress

RECORD = {
    "round": 1,
    "clients": {"client-0": {"status": "ok", "eval": {"rouge_l": 0.5}}, "client-1": {"status": "failed"}},
    "bytes_down": 2048,
    "bytes_up": 1024,
    "seconds": {"round": 3.25},
}


def _events(progress: RunProgress) -> None:
    """One round of two clients (the second fails), then the final evaluation of one."""
    for position, (client, error) in enumerate((("client-0", None), ("client-1", "RuntimeError: boom")), start=1):
        task = ClientTask(client, 1)
        progress.on_client(ClientEvent(task, position, 2))
        progress.on_client(ClientEvent(task, position, 2, Delivery(10, 5, error=error, seconds=1.5)))
    progress.on_round(RECORD)
    final = ClientTask("client-0", 2, train=False)
    progress.on_client(ClientEvent(final, 1, 1))
    progress.on_client(ClientEvent(final, 1, 1, Delivery(10, seconds=0.5)))


def test_off_a_terminal_each_client_is_a_line_when_it_finishes_and_each_round_one_more():
    out = io.StringIO()
    with RunProgress(Console(file=out, width=200), rounds=1) as progress:
        assert not progress.live
        _events(progress)
    assert out.getvalue().splitlines() == [
        "round 1/1, client-0 (1/2): done, 1.5 s",
        "round 1/1, client-1 (2/2): failed: RuntimeError: boom, 1.5 s",
        "round 1: 1/2 clients ok, eval ROUGE-L 0.500 (before training), 2,048 B down / 1,024 B up, 3.2 s",
        "final evaluation, client-0 (1/1): done, 0.5 s",
    ]


def test_on_a_terminal_bars_show_rounds_and_clients_with_an_eta():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    with RunProgress(console, rounds=1) as progress:
        assert progress.live
        _events(progress)
        assert progress._bars is not None
        rounds, clients = progress._bars.tasks
        assert (rounds.completed, rounds.total) == (1, 1)
        assert (clients.description, clients.completed, clients.total) == ("final evaluation", 1, 1)
    text = out.getvalue()
    assert "ETA" in text and "rounds" in text
    assert "round 1: 1/2 clients ok" in text
    assert "client-1 (2/2)" not in text  # no plain lines beside the bars

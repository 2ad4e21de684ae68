"""What a run prints while it runs: progress of rounds and clients, and one line per finished round.

On a terminal: two live rich bars (the rounds; the current round's clients) with elapsed time and
ETA. Elsewhere (a log file, CI): one plain line per client as it finishes. Either way every round
ends with one summary line. The runtime reports through callbacks (``on_client``, ``on_round``), so
nothing here reaches into the federation.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedexperts.failures import clip_message

if TYPE_CHECKING:
    from fedexperts.federation.inprocess import ClientEvent


def round_line(record: dict[str, Any]) -> str:
    """One round's record in a line: clients ok, mean eval ROUGE-L (before training), bytes, seconds."""
    clients = record["clients"].values()
    ok = sum(entry["status"] == "ok" for entry in clients)
    scored = [entry["eval"]["rouge_l"] for entry in clients if entry.get("eval")]
    score = f", eval ROUGE-L {sum(scored) / len(scored):.3f} (before training)" if scored else ""
    return (
        f"round {record['round']}: {ok}/{len(record['clients'])} clients ok{score}, "
        f"{record['bytes_down']:,} B down / {record['bytes_up']:,} B up, {record['seconds']['round']:.1f} s"
    )


def _stage(event: ClientEvent, rounds: int) -> str:
    return "final evaluation" if event.task.round > rounds else f"round {event.task.round}/{rounds}"


class RunProgress:
    """A run's progress display; use as a context manager around the run, pass its methods as callbacks.

    ``live`` (default: when ``console`` is a terminal) shows the bars; otherwise plain lines.
    """

    def __init__(self, console: Console, rounds: int, *, live: bool | None = None) -> None:
        self.console = console
        self.rounds = rounds
        self.live = console.is_terminal if live is None else live
        self._bars: Progress | None = None
        self._rounds_bar: TaskID | None = None
        self._clients_bar: TaskID | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[client]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._rounds_bar = self._bars.add_task("rounds", total=self.rounds, client="")
            self._clients_bar = self._bars.add_task("clients", total=None, client="")
            self._bars.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def on_client(self, event: ClientEvent) -> None:
        """A client started (bars only) or finished (a bar step, or a plain line off a terminal)."""
        stage = _stage(event, self.rounds)
        if self._bars is not None and self._clients_bar is not None and self._rounds_bar is not None:
            if event.delivery is None and event.position == 1:  # a new exchange: the bar starts over
                self._bars.reset(self._clients_bar, total=event.total, description=stage)
                self._bars.update(self._rounds_bar, completed=min(event.task.round - 1, self.rounds))
            done = event.position - (event.delivery is None)
            self._bars.update(self._clients_bar, completed=done, client=escape(event.task.client_id))
            return
        if event.delivery is None:
            return
        outcome = "done" if event.delivery.error is None else f"failed: {clip_message(event.delivery.error)}"
        self.console.print(
            f"{stage}, {event.task.client_id} ({event.position}/{event.total}): {outcome}, "
            f"{event.delivery.seconds:.1f} s",
            markup=False,
            highlight=False,
        )

    def on_round(self, record: dict[str, Any]) -> None:
        """A round ended: its summary line, and the rounds bar steps."""
        self.console.print(round_line(record), markup=False)
        if self._bars is not None and self._rounds_bar is not None:
            self._bars.update(self._rounds_bar, completed=record["round"])

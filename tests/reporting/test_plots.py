"""What the run plots draw (checked on the figure, before it becomes a PNG)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedexperts.reporting import load_run, plots

from .helpers import client_final, client_round, final_line, round_line, run_line, scores, simple_run, write_run


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure) or Path(path))
    return drawn


def test_rounds_are_plotted_at_their_own_numbers_and_the_final_evaluation_after_them(tmp_path, figures):
    record = load_run(simple_run(tmp_path / "run", curve=(0.2, 0.5, 0.6)))
    plots.plot_rounds(record, tmp_path / "rounds.png")
    scores_axes = figures[0].axes[0]
    rouge = scores_axes.lines[0]
    assert list(rouge.get_xdata()) == [1, 2, 3]  # summary.md's table numbers its rows 1, 2, 3 too
    assert list(rouge.get_ydata()) == pytest.approx([0.2, 0.5, 0.6])
    finals = [collection.get_offsets()[0][0] for collection in scores_axes.collections]
    assert finals == [4, 4]  # after round 3
    assert "final" in [text.get_text() for text in scores_axes.texts]
    assert scores_axes.get_xlabel() == "round (evaluated before its training)"


def test_zero_bars_are_drawn_as_a_visible_zero(tmp_path, figures):
    zero_up = {name: client_round(evaluation=scores(), bytes_up=0) for name in ("a", "b")}
    lines = [
        run_line(["a", "b"], rounds=1),
        round_line(1, zero_up),
        final_line({"a": client_final(scores(0.0, 0.0)), "b": client_final(scores(0.5, 0.25))}),
    ]
    record = load_run(write_run(tmp_path / "run", lines))
    plots.plot_bytes(record, tmp_path / "bytes.png")
    plots.plot_clients(record, tmp_path / "clients.png")
    bytes_axes, clients_axes = figures[0].axes[0], figures[1].axes[0]
    assert [text.get_text() for text in bytes_axes.texts] == ["0"]  # nothing went up; down is not zero
    assert [line.get_ydata().tolist() for line in bytes_axes.lines] == [[0, 0]]
    assert [text.get_text() for text in clients_axes.texts] == ["0", "0"]  # client a: exact match and ROUGE-L

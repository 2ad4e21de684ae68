from rich.console import Console

from fedexperts.reporting import final_table, load_run, report_markdown, write_report

from .helpers import client_final, client_round, final_line, round_line, run_line, scores, simple_run, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _render(table) -> str:
    console = Console(record=True, width=160)
    console.print(table)
    return console.export_text()


def _failing_run(tmp_path):
    lines = [
        run_line(["a", "b", "c"], rounds=2),
        round_line(
            1,
            {
                "a": client_round(evaluation=scores(0.2), peak_memory_bytes=3 * 1024**2),
                "b": client_round("failed", scores(0.4), error="CUDA out of memory\nat step 3", bytes_up=0),
            },
        ),
        round_line(2, {"b": client_round("rejected", scores(0.5), error="update | not finite")}),
        final_line(
            {
                "a": client_final(scores(0.3, 0.1)),
                "b": client_final(scores(0.5, 0.3), probes=0.6),
                "c": {"status": "failed", "error": "RuntimeError: oom", "own": None, "union": None, "probes": None},
            }
        ),
    ]
    return write_run(tmp_path / "run", lines)


def test_report_files(tmp_path):
    directory = simple_run(tmp_path / "run")
    (directory / "summary.md").write_text("an older report")
    written = write_report(directory)
    names = [path.name for path in written]
    assert names == ["summary.md", "plot_clients.png", "plot_rounds.png", "plot_bytes.png"]
    for path in written[1:]:
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert all(path.parent == directory for path in written)
    assert not [path for path in directory.iterdir() if path.name.startswith(".")]  # no temporaries left
    summary = written[0].read_text()
    assert summary.startswith("# Run report: demo")
    assert "| **mean** | 0.2500 | 0.5000 | 1.0000 |" in summary  # own rouge 0.4, 0.5, 0.6
    assert "Rounds to 90% of the best: round 3 (the model after 2 completed rounds)" in summary
    assert "![plot_bytes](plot_bytes.png)" in summary
    assert "| train | 18.00 | 60.0% |" in summary  # three rounds of 6 s train out of 10 s
    assert "down 300 B, up 150 B" in summary  # per round: three clients of 100 down, 50 up
    assert "## Failures and rejections\n\nNone." in summary
    assert '```toml\n[model]\nname = "builtin"' in summary


def test_headline_shows_the_later_scores_when_measured(tmp_path):
    old = report_markdown(load_run(simple_run(tmp_path / "old")))
    assert "personalized score (mean over clients of each final model on its own test split): ROUGE-L 0.5000, " in old
    assert "exact match 0.2500 (3 clients)" in old and "token F1" not in old
    later = {"rouge_1": 0.75, "rouge_2": 0.125, "token_f1": 0.5, "accuracy": 0.25}
    new = report_markdown(load_run(simple_run(tmp_path / "new", later=later)))
    assert (
        "ROUGE-L 0.5000, exact match 0.2500, ROUGE-1 0.7500, ROUGE-2 0.1250, token F1 0.5000, accuracy 0.2500 "
        "(3 clients)" in new
    )
    assert "- union score (mean over clients, union test set): ROUGE-L 0.2500, exact match 0.2500 (3 clients)" in new


def test_report_lists_failures_per_round(tmp_path):
    summary = report_markdown(load_run(_failing_run(tmp_path)))
    assert "- round 1: client b failed: CUDA out of memory at step 3" in summary
    assert "- round 2: client b rejected: update | not finite" in summary
    assert "- final evaluation: client c failed: RuntimeError: oom" in summary
    assert "| c | – | – | – | – | – | – | – |" in summary
    assert "peak memory (max over clients and rounds): 3 MiB (client a, round 1)" in summary
    assert "| 2 | 1 | 0 | 0 | 1 | 1 |" in summary  # round 2: sampled, ok, failed, rejected, evaluated
    assert "probe accuracy (mean over clients): 0.6000" in summary


def test_report_of_unfinished_run_into_another_folder(tmp_path):
    directory = simple_run(tmp_path / "run", finished=False)
    written = write_report(directory, out_dir=tmp_path / "out")
    assert [path.name for path in written] == ["summary.md", "plot_rounds.png", "plot_bytes.png"]
    assert all(path.parent == tmp_path / "out" for path in written)
    summary = written[0].read_text()
    assert "**incomplete**: 3 of 3 rounds, no final record" in summary
    assert "No final record" in summary


def test_report_with_no_progress(tmp_path):
    summary = report_markdown(load_run(simple_run(tmp_path / "run", curve=(0.0, 0.0))))
    assert "Rounds to 90% of the best: undefined" in summary


def test_report_without_rounds(tmp_path):
    directory = write_run(tmp_path / "run", [run_line()], config=None)
    written = write_report(directory)
    assert [path.name for path in written] == ["summary.md"]
    assert "No round completed." in written[0].read_text()


def test_final_table(tmp_path):
    record = load_run(_failing_run(tmp_path))
    table = final_table(record)
    assert table.row_count == 4  # a, b, c (no final scores) and the mean
    text = _render(table)
    assert "mean" in text and "0.4000" in text  # mean own ROUGE-L of 0.3 and 0.5
    unfinished = final_table(load_run(simple_run(tmp_path / "other", finished=False)))
    assert unfinished.row_count == 0 and "no final record" in _render(unfinished)

"""``fedexperts compare`` and ``fedexperts claims``: runs of several methods over seeds, and what they show."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedexperts.cli_common import ARGS, ARGS_METAVAR, config_and_overrides, console, wrote
from fedexperts.errors import FedExpertsError
from fedexperts.failures import user_errors

studies_app = typer.Typer()
_DEFAULT_METHODS = ("local", "fedavg", "flex")


@studies_app.command()
@user_errors
def compare(
    args: Annotated[
        list[str] | None, typer.Argument(metavar=ARGS_METAVAR, help=f"{ARGS} shared by every run", show_default=False)
    ] = None,
    study: Annotated[str | None, typer.Option(help="A preset study (see --list-studies); args still apply.")] = None,
    algorithms: Annotated[str | None, typer.Option(help="Comma-separated algorithm names.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated federation seeds (data stays fixed).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder of the runs and comparison (default: output_dir/name).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Report every method's paired difference to this one (default: the study's own method)."),
    ] = None,
    list_studies: bool = typer.Option(False, "--list-studies", help="List the preset studies and exit."),
) -> None:
    """Run several algorithms and seeds on the same data and partition; report mean and 95% CI per method, and
    each method's difference to the reference paired by seed (95% t-interval, Wilcoxon signed-rank p).

    Finished runs in the folder are reused and unfinished ones resumed, so a stopped comparison continues.
    """
    from fedexperts.config import check_local_paths, load_config
    from fedexperts.studies import STUDIES, split_method
    from fedexperts.studies import study as find_study

    if list_studies:
        for known in STUDIES.values():
            console.print(f"[bold]{known.name}[/]: {escape(known.description)} ({', '.join(known.algorithms)})")
        return
    path, overrides = config_and_overrides(args)
    preset = find_study(study) if study else None
    names = [
        name.strip() for name in (algorithms or ",".join(preset.algorithms if preset else _DEFAULT_METHODS)).split(",")
    ]
    names = [name for name in names if name]
    seed_text = seeds or ",".join(str(seed) for seed in (preset.seeds if preset else (0, 1, 2)))
    try:
        seed_values = [int(seed) for seed in seed_text.split(",") if seed.strip()]
    except ValueError:
        raise FedExpertsError(f"--seeds must be comma-separated integers, got {seed_text!r}") from None
    if not names or not seed_values:
        raise FedExpertsError("--algorithms and --seeds must each name at least one value")
    reference = reference or (preset.reference if preset is not None and preset.reference in names else None)
    if reference is not None and reference not in names:
        raise FedExpertsError(f"--reference {reference!r} is not one of the compared methods: {', '.join(names)}")

    def method(name: str) -> list[str]:
        """A method's overrides: the study's (shared, algorithm's, variant's), the user's, then the algorithm."""
        algorithm, variant = split_method(name)
        if preset is None and variant is not None:
            raise FedExpertsError(f"method {name!r}: a variant (after '@') needs a --study that defines it")
        study_overrides = [*preset.run_overrides(name), f"name={preset.name}"] if preset is not None else []
        return [*study_overrides, *overrides, f"algorithm.name={algorithm}"]

    base = load_config(path, method(names[0]))
    folder = out or base.output_dir / base.name
    runs = [  # every run's config is validated before the first one starts, and before torch loads
        (name, seed, load_config(path, [*method(name), f"federation.seed={seed}"]))
        for name in names
        for seed in seed_values
    ]
    for _name, _seed, config in runs:
        check_local_paths(config)

    from fedexperts.federation.inprocess import run_experiment
    from fedexperts.federation.rundir import is_run_dir
    from fedexperts.progress import RunProgress
    from fedexperts.reporting import compare as compare_runs
    from fedexperts.reporting import comparison_table, load_run, paired_table, write_comparison, write_report
    from fedexperts.reporting.compare import METRICS
    from fedexperts.reporting.paper_layout import paper_metrics, write_paper_table
    from fedexperts.reporting.schema import METRICS_FILE

    groups: dict[str, list[Any]] = {}
    for name, seed, config in runs:
        run_dir = folder / name / f"seed-{seed}"
        finished = (run_dir / METRICS_FILE).exists() and load_run(run_dir).final is not None
        if not finished:
            console.print(f"[bold]{escape(name)}[/], seed {seed} -> {escape(str(run_dir))}")
            with RunProgress(console, config.federation.rounds) as progress:
                run_experiment(
                    config,
                    run_dir,
                    resume=is_run_dir(run_dir),
                    on_round=progress.on_round,
                    on_client=progress.on_client,
                )
            write_report(run_dir)
        groups.setdefault(name, []).append(load_run(run_dir))
    tasks = preset.tasks if preset is not None else {}
    metrics = (*METRICS, *paper_metrics(tasks)) if tasks else METRICS
    comparison = compare_runs(groups, metrics=metrics, reference=reference)
    console.print(comparison_table(comparison))
    if (paired := paired_table(comparison)) is not None:
        console.print(paired)
    written = write_comparison(folder, comparison)
    if tasks:
        written.append(write_paper_table(folder, comparison, tasks))
    wrote(written)


@studies_app.command()
@user_errors
def claims(
    studies_dir: Annotated[
        Path, typer.Argument(help="The folder of the studies' runs (`output_dir` of `fedexperts compare --study`).")
    ],
    write: Annotated[
        Path | None,
        typer.Option(help="Rewrite the claims part of this Markdown file (e.g. docs/RESULTS.md) with the table."),
    ] = None,
) -> None:
    """Each claim of the FLEx and FedMoE papers against the studies' runs: paired difference and verdict."""
    from rich.table import Table

    from fedexperts.reporting.claims import claim_rows, write_claims

    rows = claim_rows(studies_dir)
    table = Table(title=f"the papers' claims against {studies_dir}")
    for column in ("paper", "claim", "study", "ours (paired by seed)", "verdict"):
        table.add_column(column)
    for row in rows:
        claim = row.claim
        text = f"{claim.method} {claim.text} ({claim.baseline})"
        table.add_row(claim.paper, text, claim.study, row.ours, row.verdict)
    console.print(table)
    if write is not None:
        wrote([write_claims(write, rows)])

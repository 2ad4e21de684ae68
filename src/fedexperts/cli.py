"""The ``fedexperts`` command line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedexperts.errors import FedExpertsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
_F = TypeVar("_F", bound=Callable[..., Any])


def user_errors(command: _F) -> _F:
    """Report a :class:`FedExpertsError` as one red line and exit 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedExpertsError as error:
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {error}")
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@app.callback()
def main() -> None:
    """fedexperts: federated fine-tuning of Mixture-of-Experts LLMs with personalized experts."""


@app.command()
@user_errors
def demo(
    model_type: str = typer.Option("olmoe", help="Family of the tiny random model to operate on."),
    seed: int = typer.Option(0, help="Seed for weights and calibration tokens."),
) -> None:
    """Show MoE surgery on a tiny random model: routing, sub-MoE pruning, grafting, roles."""
    from fedexperts.demo import run_demo

    run_demo(model_type, seed, console)


def _config_and_overrides(args: list[str] | None) -> tuple[Path | None, list[str]]:
    """``[CONFIG] [key=value ...]``: words with ``=`` are overrides, one other word is the TOML file."""
    files = [arg for arg in args or [] if "=" not in arg]
    if len(files) > 1:
        raise FedExpertsError(f"one config file at most, got {', '.join(files)} (overrides are key=value)")
    return (Path(files[0]) if files else None), [arg for arg in args or [] if "=" in arg]


def _print_round(record: dict[str, Any]) -> None:
    clients = record["clients"].values()
    ok = sum(entry["status"] == "ok" for entry in clients)
    scored = [entry["eval"]["rouge_l"] for entry in clients if entry.get("eval")]
    score = f", eval ROUGE-L {sum(scored) / len(scored):.3f} (before training)" if scored else ""
    console.print(
        f"round {record['round']}: {ok}/{len(record['clients'])} clients ok{score}, "
        f"{record['bytes_down']:,} B down / {record['bytes_up']:,} B up, {record['seconds']['round']:.1f} s"
    )
    for client, entry in record["clients"].items():
        if entry["status"] != "ok":
            console.print(
                f"  [yellow]{escape(client)} {entry['status']}[/]: {escape(str(entry['error']))}", highlight=False
            )


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def run(
    args: Annotated[
        list[str] | None, typer.Argument(help="[CONFIG.toml] [key=value ...] (no config: the default)")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where the run writes (default: output_dir/name).")] = None,
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped run in its run directory."),
    resume_from: Annotated[
        int | None, typer.Option(help="Continue after this earlier completed round (drops the later ones).")
    ] = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in the run directory first (only the files fedexperts wrote)."
    ),
) -> None:
    """Run one federated experiment in this process; print per-client results; write the run directory."""
    from fedexperts.config import load_config

    path, overrides = _config_and_overrides(args)
    config = load_config(path, overrides)  # before torch loads: a bad config is reported in about a second

    from fedexperts.federation.inprocess import run_experiment
    from fedexperts.reporting import final_table, load_run, write_report

    target = run_dir or config.output_dir / config.name
    console.print(
        f"[bold]{config.name}[/]: {config.algorithm.name} on {config.data.source} with {config.model.name}, "
        f"{config.federation.clients} clients x {config.federation.rounds} rounds -> {target}"
    )
    result = run_experiment(
        config, target, resume=resume, resume_from=resume_from, overwrite=overwrite, on_round=_print_round
    )
    written = write_report(result.run_dir)
    console.print(final_table(load_run(result.run_dir)))
    console.print(f"wrote {', '.join(str(p) for p in written)}")


@app.command()
@user_errors
def routing(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fedexperts run`.")]) -> None:
    """Expert usage heatmaps of every client's final model and, for FLEx, gate openings per category."""
    from fedexperts.analysis import analyse_run, plot_analysis

    written = plot_analysis(analyse_run(run_dir), run_dir)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


@app.command()
@user_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fedexperts run`.")]) -> None:
    """Rebuild a run's summary.md and plots from its metrics.jsonl."""
    from fedexperts.reporting import final_table, load_run, write_report

    written = write_report(run_dir)
    console.print(final_table(load_run(run_dir)))
    console.print(f"wrote {', '.join(str(p) for p in written)}")


_DEFAULT_METHODS = ("local", "fedavg", "flex")


@app.command()
@user_errors
def compare(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.toml] [key=value ...] shared by every run")] = None,
    study: Annotated[str | None, typer.Option(help="A preset study (see --list-studies); args still apply.")] = None,
    algorithms: Annotated[str | None, typer.Option(help="Comma-separated algorithm names.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated federation seeds (data stays fixed).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder of the runs and comparison (default: output_dir/name).")
    ] = None,
    list_studies: bool = typer.Option(False, "--list-studies", help="List the preset studies and exit."),
) -> None:
    """Run several algorithms and seeds on the same data and partition; report mean and 95% CI per method.

    Finished runs in the folder are reused and unfinished ones resumed, so a stopped comparison continues.
    """
    from fedexperts.config import load_config
    from fedexperts.federation.inprocess import run_experiment
    from fedexperts.federation.rundir import is_run_dir
    from fedexperts.reporting import compare as compare_runs
    from fedexperts.reporting import comparison_table, load_run, write_comparison, write_report
    from fedexperts.reporting.schema import METRICS_FILE
    from fedexperts.studies import STUDIES
    from fedexperts.studies import study as find_study

    if list_studies:
        for known in STUDIES.values():
            console.print(f"[bold]{known.name}[/]: {known.description} ({', '.join(known.algorithms)})")
        return
    path, overrides = _config_and_overrides(args)
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

    def method(name: str) -> list[str]:
        """A method's overrides: the study's (shared, then the method's own), the user's, then the method's name."""
        study_overrides = [*preset.run_overrides(name), f"name={preset.name}"] if preset is not None else []
        return [*study_overrides, *overrides, f"algorithm.name={name}"]

    base = load_config(path, method(names[0]))
    folder = out or base.output_dir / base.name
    runs = [  # every run's config is validated before the first one starts
        (name, seed, load_config(path, [*method(name), f"federation.seed={seed}"]))
        for name in names
        for seed in seed_values
    ]
    groups: dict[str, list[Any]] = {}
    for name, seed, config in runs:
        run_dir = folder / name / f"seed-{seed}"
        finished = (run_dir / METRICS_FILE).exists() and load_run(run_dir).final is not None
        if not finished:
            console.print(f"[bold]{name}[/], seed {seed} -> {run_dir}")
            run_experiment(config, run_dir, resume=is_run_dir(run_dir), on_round=_print_round)
            write_report(run_dir)
        groups.setdefault(name, []).append(load_run(run_dir))
    pairs = [pair for pair in (preset.pairs if preset else ()) if all(name in groups for name in pair)]
    comparison = compare_runs(groups, pairs=pairs)
    console.print(comparison_table(comparison))
    console.print(f"wrote {', '.join(str(p) for p in write_comparison(folder, comparison))}")


@app.command()
@user_errors
def pretrain(
    recipe: str = typer.Option(
        "default", help="default (the built-in base model), experts32 (32 experts per layer) or micro (for tests)."
    ),
    output: Annotated[Path | None, typer.Option(help="Write the checkpoint here instead of the cache folder.")] = None,
    force: bool = typer.Option(False, "--force", help="Train again even if this recipe is already built."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: every available core)."),
) -> None:
    """Pretrain the built-in tiny MoE on ExpertBench; save checkpoint and model card (cached by recipe hash)."""
    from fedexperts.models.builtin import is_built, model_path, resolve_recipe
    from fedexperts.models.builtin import pretrain as run_pretraining

    chosen = resolve_recipe(recipe)
    target = output or model_path(chosen)
    if is_built(target, chosen) and not force:
        console.print(f"already built: {target} (recipe {chosen.name}, hash {chosen.digest()}); --force trains again")
    else:
        console.print(f"pretraining recipe {chosen.name} (hash {chosen.digest()}) into {target}")
        run_pretraining(chosen, target, threads=threads)
    _show_model_summary(target)


def _show_model_summary(path: Path) -> None:
    """Print the card's main numbers from a built checkpoint's metrics file."""
    import json

    from rich.table import Table

    from fedexperts.data.expertbench import CATEGORIES
    from fedexperts.models.builtin import METRICS_FILE

    metrics = json.loads((path / METRICS_FILE).read_text())
    console.print(
        f"{path}\n{metrics['parameters'] / 1e6:.2f}M parameters; pretraining took {metrics['train']['seconds']:.0f} s "
        f"(whole command {metrics['total_seconds']:.0f} s, {metrics['threads']} threads); "
        f"probe accuracy {metrics['probe_accuracy']:.1%} on {metrics['probe_count']} facts "
        f"(chance {metrics['probe_chance']:.0%})"
    )
    table = Table(title="held-out tasks (greedy) and routing per category")
    for column in ("category", "EM canonical", "ROUGE-L canonical", "EM clients", "ROUGE-L clients", "routing entropy"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category in CATEGORIES:
        canonical, clients = metrics["canonical"][category], metrics["client_styles"][category]
        table.add_row(
            category,
            f"{canonical['exact_match']:.2f}",
            f"{canonical['rouge_l']:.2f}",
            f"{clients['exact_match']:.2f}",
            f"{clients['rouge_l']:.2f}",
            f"{metrics['routing_entropy_bits'][category]:.3f} bits",
        )
    console.print(table)
    console.print(
        f"routing: total variation {metrics['routing_between_categories_tv']:.3f} between categories vs "
        f"{metrics['routing_within_category_tv']:.3f} within a category (split halves); card: {path / 'README.md'}"
    )


def _data_default(key: str) -> Any:
    """The default of ``data.KEY`` (``federation.clients`` for ``clients``), so ``partition`` and ``run`` agree."""
    from fedexperts.config import DataConfig, FederationConfig

    section = FederationConfig if key == "clients" else DataConfig
    return section.model_fields[key].default


@app.command()
@user_errors
def partition(
    source: str = typer.Argument(..., help="Local file or folder, hub dataset name, or 'expertbench'."),
    columns: str | None = typer.Option(None, help="Preset (dolly, alpaca) or field=column pairs; default: detect."),
    split: str = typer.Option("train", help="Split of a hub dataset."),
    scheme: str = typer.Option(_data_default("scheme"), help="iid, dirichlet or pathological."),
    clients: int = typer.Option(_data_default("clients"), help="Number of clients."),
    alpha: float = typer.Option(_data_default("alpha"), help="Dirichlet concentration (small: skewed)."),
    classes_per_client: int = typer.Option(_data_default("classes_per_client"), help="Pathological: per client."),
    test_fraction: float = typer.Option(_data_default("test_fraction"), help="Share of rows held out for testing."),
    categories: str | None = typer.Option(None, help="Comma-separated categories to keep (default: all)."),
    rows_per_client: int | None = typer.Option(None, help="Draw this many training rows per client, with replacement."),
    test_per_category: int | None = typer.Option(None, help="Hold out this many test rows of each category."),
    seed: int = typer.Option(_data_default("seed"), help="Seed of the split (and of ExpertBench's items)."),
    items: int = typer.Option(_data_default("items"), help="ExpertBench: how many tasks to generate."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Drop rows with missing fields, and count them."),
    plot: Annotated[Path | None, typer.Option(help="Also save a bar chart of the partition as this PNG.")] = None,
) -> None:
    """Split instruction data across clients by category and report counts per client (table, plot).

    The defaults are ``fedexperts run``'s (``data.*`` and ``federation.clients``), and so is the split:
    ExpertBench rows are rendered in each client's answer style, as a run sees them.
    """
    from fedexperts.config import build_config
    from fedexperts.data import load_instructions, partition_table, plot_partition
    from fedexperts.data import partition as split_data
    from fedexperts.data.partition import Scheme, spec_from_config

    schemes = [option.value for option in Scheme]
    if scheme not in schemes:
        raise FedExpertsError(f"unknown scheme {scheme!r}; schemes: {', '.join(schemes)}")
    chosen = [item.strip() for item in categories.split(",") if item.strip()] if categories is not None else None
    data = {
        "scheme": scheme,
        "alpha": alpha,
        "classes_per_client": classes_per_client,
        "test_fraction": test_fraction,
        "seed": seed,
        "items": items,
        "categories": chosen,
        "rows_per_client": rows_per_client,
        "test_per_category": test_per_category,
    }
    config = build_config({"data": data, "federation": {"clients": clients}})
    spec = spec_from_config(config.data, clients)
    if source == "expertbench":
        from fedexperts.data.expertbench import ExpertBench
        from fedexperts.models.builtin.recipe import RECIPES

        result = ExpertBench.from_seed(RECIPES["default"].world_seed).federated(items, spec).partition
    else:
        loaded = load_instructions(source, columns=columns, split=split, skip_bad_rows=skip_bad_rows)
        if loaded.skipped:
            console.print(f"[yellow]skipped {len(loaded.skipped)} bad rows[/], first: {loaded.skipped[0]}")
        result = split_data(loaded.dataset, spec)
    console.print(partition_table(result))
    if plot is not None:
        console.print(f"plot: {plot_partition(result, plot)}")


@app.command()
@user_errors
def plan(
    model: Annotated[
        str | None, typer.Argument(help="Preset name, a config.json or a folder holding one, or 'all'.")
    ] = None,
    algorithm: str | None = typer.Option(None, help="Shorthand for --set algorithm.name=NAME."),
    config: Annotated[Path | None, typer.Option(help="Experiment TOML whose [algorithm] section is used.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override dotted.key=value (repeatable).")
    ] = None,
    dtype: str = typer.Option("bfloat16", help="Dtype of the client's weights: bfloat16, float16 or float32."),
    transfer_dtype: str | None = typer.Option(None, help="Cast floating tensors on the wire (bfloat16, float16)."),
    every_preset: bool = typer.Option(False, "--all", help="Compare every preset in one table."),
) -> None:
    """Size a federation from the model config alone: parameters by role, bytes per round, client memory."""
    from fedexperts.config import load_config
    from fedexperts.planning import PRESETS
    from fedexperts.planning import plan as make_plan
    from fedexperts.reporting.plan_tables import comparison_table, plan_table

    settings = [f"algorithm.name={algorithm}"] if algorithm is not None else []
    experiment = load_config(config, settings + list(overrides or []))
    if every_preset or model == "all":
        plans = [make_plan(name, experiment.algorithm, dtype=dtype, transfer_dtype=transfer_dtype) for name in PRESETS]
        console.print(comparison_table(plans))
        return
    if model is None:
        raise FedExpertsError(
            f"give a MODEL (a preset, a config.json or a folder) or --all; presets: {', '.join(PRESETS)}"
        )
    console.print(plan_table(make_plan(model, experiment.algorithm, dtype=dtype, transfer_dtype=transfer_dtype)))


flower_app = typer.Typer(no_args_is_help=True, help="Run experiments on Flower (simulation or deployment).")
app.add_typer(flower_app, name="flower")


@flower_app.command("simulate")
@user_errors
def flower_simulate(
    args: Annotated[
        list[str] | None, typer.Argument(help="[CONFIG.toml] [key=value ...] (no config: the default)")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where the run writes (default: output_dir/name).")] = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in the run directory first (only the files fedexperts wrote)."
    ),
    cpus_per_client: float = typer.Option(1.0, help="CPU cores each simulated client (Ray actor) takes."),
) -> None:
    """Run one experiment on Flower's simulation engine (Ray): one SuperNode per client, on this machine."""
    from fedexperts.config import load_config
    from fedexperts.federation.flower import run_simulation
    from fedexperts.reporting import final_table, load_run

    path, overrides = _config_and_overrides(args)
    config = load_config(path, overrides)
    target = run_dir or config.output_dir / config.name
    console.print(
        f"[bold]{config.name}[/] on Flower simulation: {config.algorithm.name}, "
        f"{config.federation.clients} SuperNodes x {config.federation.rounds} rounds -> {target}"
    )
    result = run_simulation(config, target, overwrite=overwrite, cpus_per_client=cpus_per_client, on_round=_print_round)
    console.print(final_table(load_run(result.run_dir)))


@flower_app.command("app")
@user_errors
def flower_write_app(
    args: Annotated[
        list[str] | None, typer.Argument(help="[CONFIG.toml] [key=value ...] (no config: the default)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder of the Flower app (created).")] = Path("flower-app"),
) -> None:
    """Write a Flower app folder for `flwr run` (deployment or Flower's local simulation) holding this config."""
    from fedexperts.config import load_config
    from fedexperts.federation.flower.app_dir import write_app

    path, overrides = _config_and_overrides(args)
    written = write_app(load_config(path, overrides), out)
    console.print(f"wrote {written}; run it with: flwr run {out} <connection> [--run-config 'key=value ...']")


if __name__ == "__main__":
    app()

"""The fedexperts command line.

Every command validates its input (config, paths) before torch loads, reports a user's mistake or a
fixable environment problem (disk full, no permission) in one line with exit code 2, and a bug as a
short traceback without local variables with exit code 1 (``--debug``: the full traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedexperts import cli_export
from fedexperts.cli_common import ConfigArgs, config_and_overrides, console, wrote
from fedexperts.cli_studies import studies_app
from fedexperts.errors import FedExpertsError
from fedexperts.failures import user_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,  # rich's tracebacks print every frame's locals: clients' tokens and weights
)


def _print_version(value: bool) -> None:
    from importlib.metadata import PackageNotFoundError, version

    if value:
        try:
            typer.echo(f"fedexperts {version('fedexperts')}")
        except PackageNotFoundError:  # a source tree on the path, not installed
            from fedexperts import __version__

            typer.echo(f"fedexperts {__version__} (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    context: typer.Context,
    debug: bool = typer.Option(
        False, "--debug", help="On an unexpected error print the full traceback (never local variables)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print fedexperts' version and exit."
    ),
) -> None:
    """fedexperts: federated fine-tuning of Mixture-of-Experts LLMs with personalized experts."""
    context.obj = {"debug": debug}


@app.command()
@user_errors
def demo(
    model_type: str = typer.Option("olmoe", help="Family of the tiny random model to operate on."),
    seed: int = typer.Option(0, help="Seed for weights and calibration tokens."),
) -> None:
    """Show MoE surgery on a tiny random model: routing, sub-MoE pruning, grafting, roles."""
    from fedexperts.demo import run_demo

    run_demo(model_type, seed, console)


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def run(
    args: ConfigArgs = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where the run writes (default: output_dir/name).")] = None,
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped run in its run directory."),
    resume_from: Annotated[
        int | None, typer.Option(help="Continue after this earlier completed round (drops the later ones).")
    ] = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in the run directory first (only the files fedexperts wrote)."
    ),
) -> None:
    """Run one federated experiment in this process; print per-client results; write the run directory.

    CONFIG is an experiment TOML file (see `fedexperts config show`); each key=value overrides a dotted key.
    """
    from fedexperts.config import check_local_paths, load_config

    path, overrides = config_and_overrides(args)
    config = load_config(path, overrides)  # before torch loads: a bad config is reported in about a second
    check_local_paths(config)

    from fedexperts.federation.inprocess import run_experiment
    from fedexperts.progress import RunProgress
    from fedexperts.reporting import final_table, load_run, write_report

    target = run_dir or config.output_dir / config.name
    console.print(
        f"[bold]{escape(config.name)}[/]: {config.algorithm.name} on {escape(config.data.source)} with "
        f"{escape(config.model.name)}, {config.federation.clients} clients x {config.federation.rounds} rounds "
        f"-> {escape(str(target))}"
    )
    with RunProgress(console, config.federation.rounds) as progress:
        result = run_experiment(
            config,
            target,
            resume=resume,
            resume_from=resume_from,
            overwrite=overwrite,
            on_round=progress.on_round,
            on_client=progress.on_client,
        )
    written = write_report(result.run_dir)
    console.print(final_table(load_run(result.run_dir)))
    wrote(written)


@app.command()
@user_errors
def routing(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fedexperts run`.")]) -> None:
    """Expert usage heatmaps of every client's final model and, for FLEx, gate openings per category."""
    from fedexperts.analysis import analyse_run, plot_analysis

    wrote(plot_analysis(analyse_run(run_dir), run_dir))


@app.command()
@user_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fedexperts run`.")]) -> None:
    """Rebuild a run's summary.md and plots from its metrics.jsonl."""
    from fedexperts.reporting import final_table, load_run, write_report

    written = write_report(run_dir)
    console.print(final_table(load_run(run_dir)))
    wrote(written)


@app.command()
@user_errors
def pretrain(
    recipe: str = typer.Option(
        "default",
        help="default (the built-in base model), experts32 (32 experts per layer), switch-8 / switch-32 "
        "(encoder-decoder Switch Transformers), micro / switch-micro (for tests).",
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
        console.print(
            f"already built: {target} (recipe {chosen.name}, hash {chosen.digest()}); --force trains again",
            markup=False,
        )
    else:
        console.print(f"pretraining recipe {chosen.name} (hash {chosen.digest()}) into {target}", markup=False)
        run_pretraining(chosen, target, threads=threads)
    from fedexperts.reporting.builtin_summary import model_summary

    for part in model_summary(target):
        console.print(part)


def _data_default(key: str) -> Any:
    """The default of ``data.KEY`` (``federation.clients`` for ``clients``), so ``partition`` and ``run`` agree."""
    from fedexperts.config import DataConfig, FederationConfig

    section = FederationConfig if key == "clients" else DataConfig
    return section.model_fields[key].default


@app.command()
@user_errors
def partition(
    source: str = typer.Argument(
        _data_default("source"), help="Local file or folder, hub dataset name, or 'expertbench'."
    ),
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

    SOURCE and the defaults are those of `fedexperts run` (data.* and federation.clients), and so is the split.

    ExpertBench rows are rendered in each client's answer style, as a run sees them.
    """
    from fedexperts.config import ConfigError, build_config, check_data_source

    check_data_source(source, "SOURCE")
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
    try:
        config = build_config({"data": data, "federation": {"clients": clients}})
    except ConfigError as error:
        message = str(error).replace("federation.clients:", "--clients (federation.clients):")
        for key in data:  # name the option the user gave, and the key it sets
            message = message.replace(f"data.{key}:", f"--{key.replace('_', '-')} (data.{key}):")
        raise ConfigError(message) from None

    from fedexperts.data import load_instructions, partition_table, plot_partition
    from fedexperts.data import partition as split_data
    from fedexperts.data.partition import spec_from_config

    spec = spec_from_config(config.data, clients)
    if source == "expertbench":
        from fedexperts.data.expertbench import ExpertBench
        from fedexperts.models.builtin.recipe import RECIPES

        result = ExpertBench.from_seed(RECIPES["default"].world_seed).federated(items, spec).partition
    else:
        loaded = load_instructions(source, columns=columns, split=split, skip_bad_rows=skip_bad_rows)
        if loaded.skipped:
            console.print(f"[yellow]skipped {len(loaded.skipped)} bad rows[/], first: {escape(loaded.skipped[0])}")
        result = split_data(loaded.dataset, spec)
    console.print(partition_table(result))
    if plot is not None:
        console.print(f"plot: {plot_partition(result, plot)}", markup=False)


@app.command()
@user_errors
def plan(
    model: Annotated[
        str | None, typer.Argument(help="Preset name, a config.json or a folder holding one, or 'all'.")
    ] = None,
    algorithm: str | None = typer.Option(None, help="Shorthand for --set algorithm.name=NAME."),
    config: Annotated[Path | None, typer.Option(help="Experiment TOML whose \\[algorithm] section is used.")] = None,
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


@app.command()
@user_errors
def families(
    write: Annotated[Path | None, typer.Option(help="Rewrite the family table between this file's markers.")] = None,
) -> None:
    """Every supported MoE family with what works on it (surgery, FLEx, FedMoE, attention LoRA), tried on meta."""
    from fedexperts.planning.support import family_table, write_family_table

    table = family_table()
    if write is not None:
        console.print(f"wrote the family table into {write_family_table(write, table)}", markup=False)
        return
    typer.echo(table)


cli_export.register(app)
config_app = typer.Typer(no_args_is_help=True, help="Experiment configs: every key, its default and description.")
app.add_typer(studies_app)  # compare, claims: top-level commands
app.add_typer(config_app, name="config")


@config_app.command("show")
@user_errors
def config_show(
    args: ConfigArgs = None,
    defaults: bool = typer.Option(False, "--defaults", help="Write every key, those at their defaults too."),
) -> None:
    """Print the resolved config as TOML, each key with its description; `fedexperts run` reads it back.

    Without --defaults only the keys that differ from their defaults are written; paths come out absolute.
    """
    from fedexperts.config import load_config
    from fedexperts.config_toml import config_toml

    path, overrides = config_and_overrides(args)
    typer.echo(config_toml(load_config(path, overrides), every_key=defaults), nl=False)


flower_app = typer.Typer(
    no_args_is_help=True, help="Run experiments on Flower (simulation or deployment).", pretty_exceptions_enable=False
)
app.add_typer(flower_app, name="flower")


@flower_app.command("simulate")
@user_errors
def flower_simulate(
    args: ConfigArgs = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where the run writes (default: output_dir/name).")] = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in the run directory first (only the files fedexperts wrote)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run in its run directory (checked first), nodes' states included."
    ),
    cpus_per_client: float = typer.Option(1.0, help="CPU cores each simulated client (Ray actor) takes."),
) -> None:
    """Run one experiment on Flower's simulation engine (Ray): one SuperNode per client, on this machine."""
    from fedexperts.config import check_local_paths, load_config

    path, overrides = config_and_overrides(args)
    config = load_config(path, overrides)
    check_local_paths(config)

    from fedexperts.federation.flower import run_simulation
    from fedexperts.progress import RunProgress
    from fedexperts.reporting import final_table, load_run

    target = run_dir or config.output_dir / config.name
    console.print(
        f"[bold]{escape(config.name)}[/] on Flower simulation: {config.algorithm.name}, "
        f"{config.federation.clients} SuperNodes x {config.federation.rounds} rounds -> {escape(str(target))}"
    )
    progress = RunProgress(console, config.federation.rounds, live=False)  # Ray's own log would break live bars
    result = run_simulation(
        config,
        target,
        resume=resume,
        overwrite=overwrite,
        cpus_per_client=cpus_per_client,
        on_round=progress.on_round,
    )
    console.print(final_table(load_run(result.run_dir)))


@flower_app.command("app")
@user_errors
def flower_write_app(
    args: ConfigArgs = None,
    out: Annotated[Path, typer.Option(help="Folder of the Flower app (created).")] = Path("flower-app"),
) -> None:
    """Write a Flower app folder for `flwr run` (deployment or Flower's local simulation) holding this config."""
    from fedexperts.config import load_config
    from fedexperts.federation.flower.app_dir import write_app

    path, overrides = config_and_overrides(args)
    written = write_app(load_config(path, overrides), out)
    console.print(
        f"wrote {written}; run it with: flwr run {out} <connection> [--run-config 'key=value ...']", markup=False
    )


if __name__ == "__main__":
    app()

"""The ``fedexperts`` command line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

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
            Console(stderr=True).print(f"[bold red]error:[/] {error}")
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


@app.command()
@user_errors
def pretrain(
    recipe: str = typer.Option("default", help="default (the built-in base model) or micro (seconds, for tests)."),
    output: Annotated[Path | None, typer.Option(help="Write the checkpoint here instead of the cache folder.")] = None,
    force: bool = typer.Option(False, "--force", help="Train again even if this recipe is already built."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: every available core)."),
) -> None:
    """Pretrain the built-in tiny MoE on ExpertBench; save checkpoint and model card (cached by recipe hash)."""
    from fedexperts.models.builtin import is_built, model_path, resolve_recipe, show_summary
    from fedexperts.models.builtin import pretrain as run_pretraining

    chosen = resolve_recipe(recipe)
    target = output or model_path(chosen)
    if is_built(target, chosen) and not force:
        console.print(f"already built: {target} (recipe {chosen.name}, hash {chosen.digest()}); --force trains again")
    else:
        console.print(f"pretraining recipe {chosen.name} (hash {chosen.digest()}) into {target}")
        run_pretraining(chosen, target, threads=threads)
    show_summary(target, console)


@app.command()
@user_errors
def partition(
    source: str = typer.Argument(..., help="Local file or folder, hub dataset name, or 'expertbench'."),
    columns: str | None = typer.Option(None, help="Preset (dolly, alpaca) or field=column pairs; default: detect."),
    split: str = typer.Option("train", help="Split of a hub dataset."),
    scheme: str = typer.Option("dirichlet", help="iid, dirichlet or pathological."),
    clients: int = typer.Option(8, help="Number of clients."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (small: skewed)."),
    classes_per_client: int = typer.Option(2, help="Pathological: categories per client."),
    test_fraction: float = typer.Option(0.2, help="Share of each client's rows held out for testing."),
    seed: int = typer.Option(0, help="Seed of the split (and of ExpertBench's items)."),
    items: int = typer.Option(2000, help="ExpertBench: how many tasks to generate."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Drop rows with missing fields, and count them."),
    plot: Annotated[Path | None, typer.Option(help="Also save a bar chart of the partition as this PNG.")] = None,
) -> None:
    """Split instruction data across clients by category and report counts per client (table, plot)."""
    from fedexperts.data import PartitionSpec, Scheme, load_instructions, partition_table, plot_partition
    from fedexperts.data import partition as split_data
    from fedexperts.data.expertbench import ExpertBench

    schemes = [option.value for option in Scheme]
    if scheme not in schemes:
        raise FedExpertsError(f"unknown scheme {scheme!r}; schemes: {', '.join(schemes)}")
    if source == "expertbench":
        dataset = ExpertBench.from_seed().dataset(items, seed=seed)
    else:
        loaded = load_instructions(source, columns=columns, split=split, skip_bad_rows=skip_bad_rows)
        if loaded.skipped:
            console.print(f"[yellow]skipped {len(loaded.skipped)} bad rows[/], first: {loaded.skipped[0]}")
        dataset = loaded.dataset
    spec = PartitionSpec(
        Scheme(scheme),
        num_clients=clients,
        alpha=alpha,
        classes_per_client=classes_per_client,
        test_fraction=test_fraction,
        seed=seed,
    )
    result = split_data(dataset, spec)
    console.print(partition_table(result))
    if plot is not None:
        console.print(f"plot: {plot_partition(result, plot)}")


if __name__ == "__main__":
    app()

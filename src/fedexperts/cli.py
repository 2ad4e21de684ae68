"""The ``fedexperts`` command line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

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


if __name__ == "__main__":
    app()

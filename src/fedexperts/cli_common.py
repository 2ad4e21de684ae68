"""What every fedexperts command shares: the console, the ``[CONFIG] [key=value ...]`` words, the "wrote" line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedexperts.errors import FedExpertsError

console = Console(soft_wrap=True)  # soft wrap: a long path stays one line, whatever the terminal's width
ARGS = "\\[CONFIG.toml] \\[key=value ...]"
"""The ``[CONFIG] [key=value ...]`` words, escaped for rich markup (typer renders help as markup)."""
ARGS_METAVAR = "[CONFIG.toml] [KEY=VALUE]..."
ConfigArgs = Annotated[
    list[str] | None,
    typer.Argument(metavar=ARGS_METAVAR, help=f"{ARGS} (no config: the default)", show_default=False),
]
"""A command's ``[CONFIG] [key=value ...]`` words (see :func:`config_and_overrides`)."""


def config_and_overrides(args: list[str] | None) -> tuple[Path | None, list[str]]:
    """``[CONFIG] [key=value ...]``: words with ``=`` are overrides, one other word is the TOML file."""
    files = [arg for arg in args or [] if "=" not in arg]
    if len(files) > 1:
        raise FedExpertsError(f"one config file at most, got {', '.join(files)} (overrides are key=value)")
    return (Path(files[0]) if files else None), [arg for arg in args or [] if "=" in arg]


def wrote(paths: list[Path]) -> None:
    console.print(f"wrote {', '.join(str(p) for p in paths)}", markup=False, highlight=False)

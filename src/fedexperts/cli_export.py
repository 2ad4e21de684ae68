"""``fedexperts export`` and ``fedexperts generate``: take a run's model home and try it.

Registered on the main app by :mod:`fedexperts.cli` (:func:`register`). Arguments, the run directory, the client id,
``--out`` and prompt files are checked before torch loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedexperts.errors import FedExpertsError
from fedexperts.failures import user_errors

console = Console(soft_wrap=True, highlight=False)
_DTYPES = ("float32", "bfloat16", "float16")


@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fedexperts run`.")],
    out: Annotated[Path, typer.Option("--out", help="The folder to write (new, or empty).")],
    client: Annotated[str | None, typer.Option("--client", help="The client whose model to export.")] = None,
    global_model: bool = typer.Option(False, "--global", help="Export the shared (global) model instead."),
    lora: str = typer.Option("merged", help="merged (into the weights) or adapter (a PEFT adapter in adapter/)."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: the run's model.dtype)."),
) -> None:
    """Write a client's model (or the global one) as a folder to ship, with its tokenizer and a model card.

    A stock architecture is written as a Hugging Face checkpoint.
    Grafted experts or per-layer expert counts: a folder for fedexperts.load_personalized.
    """
    from fedexperts.export.source import check_out, open_run

    if (client is None) == (not global_model):
        raise FedExpertsError("give --client ID or --global (one of them)")
    if lora not in ("merged", "adapter"):
        raise FedExpertsError(f"--lora {lora!r}: choose merged or adapter")
    if dtype is not None and dtype not in _DTYPES:
        raise FedExpertsError(f"--dtype {dtype!r}: choose {', '.join(_DTYPES)}")
    check_out(out)
    source = open_run(run_dir)
    if client is not None:
        source.client_index(client)

    from fedexperts.export.assemble import assemble_client, assemble_global
    from fedexperts.export.write import write_export

    assembled = assemble_client(source, client) if client is not None else assemble_global(source)
    result = write_export(assembled, out, lora="adapter" if lora == "adapter" else "merged", dtype=dtype)
    what = (
        "a Hugging Face checkpoint"
        if result.kind == "stock"
        else "a personalized folder (fedexperts.load_personalized)"
    )
    detail = f"LoRA {result.lora}" if result.lora else "no LoRA"
    console.print(f"wrote {out}: {what}, {detail}, {result.dtype}", markup=False)
    console.print(f'try it: fedexperts generate {out} "Your instruction"', markup=False)


@user_errors
def generate(
    folder: Annotated[Path, typer.Argument(help="A folder written by `fedexperts export` (or any HF MoE folder).")],
    prompt: Annotated[str | None, typer.Argument(help="An instruction (formatted as in training).")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help='A JSONL file, one {"prompt": ...} per line.')
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="With --prompts: write the JSONL here (default: stdout).")
    ] = None,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as it is, without the training template."),
) -> None:
    """Complete a prompt (or a JSONL file of them) greedily with an exported model."""
    from fedexperts.export.manifest import read_manifest
    from fedexperts.export.prompts import CONTEXT, PROMPT, check_output, read_prompts, response_lines, write_output

    if (prompt is None) == (prompts is None):
        raise FedExpertsError("give a PROMPT or --prompts FILE.jsonl (one of them)")
    if output is not None and prompts is None:
        raise FedExpertsError("--output goes with --prompts (a single completion is printed)")
    read_manifest(folder)
    rows: list[dict[str, Any]] = read_prompts(prompts) if prompts is not None else [{PROMPT: prompt}]
    if output is not None:
        check_output(output)

    from fedexperts.export.generation import load_exported

    exported = load_exported(folder)
    responses = exported.generate(
        [row[PROMPT] for row in rows],
        contexts=[row.get(CONTEXT, "") for row in rows],
        max_new_tokens=max_new_tokens,
        raw=raw,
    )
    if prompts is None:
        typer.echo(responses[0])
    elif output is None:
        typer.echo(response_lines(rows, responses), nl=False)
    else:
        write_output(output, response_lines(rows, responses))
        console.print(f"wrote {output} ({len(rows)} responses)", markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("generate")(generate)

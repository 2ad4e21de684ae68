"""JSONL prompt files for batch generation: one ``{"prompt": ...}`` per line in, the same lines with a response out.

Torch-free, so a malformed file is reported before the model loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedexperts.atomic import atomic_file
from fedexperts.errors import FedExpertsError

PROMPT, CONTEXT, RESPONSE = "prompt", "context", "response"


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Each line's object; every one needs a string ``prompt`` (an optional string ``context`` goes with it)."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FedExpertsError(f"--prompts {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FedExpertsError(f"--prompts {source}: cannot read ({error})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FedExpertsError(f"{source}, line {number}: bad JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get(PROMPT), str):
            raise FedExpertsError(f'{source}, line {number}: expected an object with a "{PROMPT}" string')
        if not isinstance(row.get(CONTEXT, ""), str):
            raise FedExpertsError(f'{source}, line {number}: "{CONTEXT}" must be a string')
        rows.append(row)
    if not rows:
        raise FedExpertsError(f"--prompts {source}: no prompts (one JSON object per line)")
    return rows


def response_lines(rows: Iterable[Mapping[str, Any]], responses: Iterable[str]) -> str:
    """Each input row with its ``response`` added, as JSONL."""
    return "".join(
        json.dumps({**row, RESPONSE: response}, ensure_ascii=False) + "\n"
        for row, response in zip(rows, responses, strict=True)
    )


def check_output(path: str | Path) -> Path:
    """``--output``: a new file (generation never replaces a file it did not write)."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise FedExpertsError(f"--output {target} exists; give a new file name")
    return target


def write_output(path: Path, text: str) -> None:
    check_output(path)
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")

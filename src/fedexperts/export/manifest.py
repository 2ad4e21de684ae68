"""``fedexperts_export.json``: what an export folder is (stock or personalized), its prompt format and origin.

transformers and peft ignore the file; ``fedexperts generate`` reads it to load the folder the right
way and to format prompts as the run's training did. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedexperts.errors import FedExpertsError

MANIFEST_FILE = "fedexperts_export.json"
FORMAT = 1
STOCK, PERSONALIZED = "stock", "personalized"
"""The two kinds of export folder: a standard Hugging Face checkpoint, or one for :func:`load_personalized`."""


def write_manifest(folder: Path, entries: dict[str, Any]) -> Path:
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"format": FORMAT, **entries}, indent=2, sort_keys=True), encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's export manifest; ``{}`` for a model folder fedexperts did not export (a stock one)."""
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise FedExpertsError(f"{folder}: no such model folder")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise FedExpertsError(f"{path}: unreadable export manifest ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise FedExpertsError(f"{path}: export manifest of format {found!r}, expected {FORMAT}")
    return data

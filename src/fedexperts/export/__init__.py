"""Take a personalized model home: export a run's client (or global) model, load it, generate from it.

``export_client`` / ``export_global`` write a folder: a stock Hugging Face checkpoint where a stock
config describes the model, else a personalized folder that ``load_personalized`` loads
(:mod:`fedexperts.export.write`). ``load_exported`` loads either kind and ``generate`` completes
prompts with it. Imported on first use, so ``import fedexperts.export`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "export_client": "fedexperts.export.write",
    "export_global": "fedexperts.export.write",
    "ExportResult": "fedexperts.export.write",
    "load_personalized": "fedexperts.export.personalized",
    "load_exported": "fedexperts.export.generation",
    "generate": "fedexperts.export.generation",
    "ExportedModel": "fedexperts.export.generation",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)

"""fedexperts: federated fine-tuning of Mixture-of-Experts LLMs with personalized experts."""

from __future__ import annotations

from typing import Any

from fedexperts.errors import FedExpertsError, SurgeryError, UnsupportedModelError

__version__ = "0.1.0"

_EXPORT = ("export_client", "export_global", "load_personalized", "load_exported", "generate")
"""Taking a model home (:mod:`fedexperts.export`), imported on first use: ``import fedexperts`` loads no torch."""

__all__ = ["FedExpertsError", "SurgeryError", "UnsupportedModelError", "__version__", *_EXPORT]


def __getattr__(name: str) -> Any:
    if name in _EXPORT:
        from fedexperts import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

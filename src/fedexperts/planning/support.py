"""What works on each MoE family: the README's family table, found by asking the code, not typed by hand.

For every descriptor, the family's tiny config (:mod:`fedexperts.models.tiny`) is built on the
``meta`` device and each capability is tried there the way a user's run would meet it: sub-MoE
surgery (:func:`~fedexperts.moe.select_experts` keeping top-k experts per layer), and FLEx,
FedMoE, FedAvg of attention LoRA and FedDPA each constructed from its default config and ``prepare``-d
on the model, which is where an algorithm accepts or refuses a family. A refusal is shown with
the algorithm's own message. A family whose ``model_type`` this transformers does not define is
shown as untested. :func:`write_family_table` rewrites the part of a file between
:data:`BEGIN` and :data:`END` (``fedexperts families --write README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from fedexperts.algorithms.fedavg.config import FedAvgConfig
from fedexperts.algorithms.feddpa.config import FedDPAConfig
from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions
from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.algorithms.settings import AlgorithmSettings
from fedexperts.atomic import atomic_file
from fedexperts.errors import FedExpertsError
from fedexperts.models.partial import meta_model
from fedexperts.models.tiny import TINY_FAMILIES, tiny_config
from fedexperts.moe.descriptors import DESCRIPTORS
from fedexperts.moe.families import moe_layers
from fedexperts.moe.family import MoEFamily
from fedexperts.moe.surgery import select_experts

BEGIN = "<!-- families:begin (fedexperts families --write FILE rewrites this part) -->"
END = "<!-- families:end -->"

_ALGORITHMS: tuple[tuple[str, Callable[[], AlgorithmSettings]], ...] = (
    ("FLEx", FlexConfig),
    ("FedMoE", lambda: FedMoEConfig(fedmoe=FedMoEOptions(budget_fraction=1.0))),  # a budget any model fits
    ("attention LoRA", FedAvgConfig),
    ("FedDPA", FedDPAConfig),  # two attention adapters weighed per example: decoder-only
)
"""Algorithms tried on each family, with the settings they are tried with (their defaults otherwise)."""


@dataclass(frozen=True)
class FamilySupport:
    """One row of the family table."""

    family: MoEFamily
    checks: dict[str, str]
    """Capability -> ``yes``, ``no: <the refusal>`` or ``untested: <why>``."""


def _outcome(attempt: Callable[[], Any]) -> str:
    try:
        attempt()
    except FedExpertsError as error:
        return f"no: {error}"
    return "yes"


def _surgery(model: Any, family: MoEFamily) -> None:
    select_experts(model, {layer.name: list(range(layer.top_k)) for layer in moe_layers(model)})


def family_support(family: MoEFamily) -> FamilySupport:
    """Try every capability on a meta model of ``family``'s tiny config."""
    names = ["surgery", *(name for name, _ in _ALGORITHMS)]
    if family.model_type not in CONFIG_MAPPING:
        why = f"untested: transformers {transformers.__version__} has no {family.model_type}"
        return FamilySupport(family, dict.fromkeys(names, why))
    if family.model_type not in TINY_FAMILIES:
        return FamilySupport(family, dict.fromkeys(names, "untested: no tiny config"))
    config = tiny_config(family.model_type)
    checks = {"surgery": _outcome(lambda: _surgery(meta_model(config, torch.float32), family))}
    if checks["surgery"] == "yes" and not family.masking_identity:
        checks["surgery"] = "yes (pruned != masked original)"
    for name, settings in _ALGORITHMS:

        def prepare(settings: Callable[[], AlgorithmSettings] = settings) -> None:
            build_algorithm(settings()).prepare(meta_model(config, torch.float32))

        checks[name] = _outcome(prepare)
    return FamilySupport(family, checks)


def _experts(family: MoEFamily) -> str:
    layout = family.layout.value
    return layout if family.experts_interface else f"{layout} (own forward)"


def _sparse_layers(family: MoEFamily) -> str:
    """The sparse-layer rule in words: its function's docstring after the family name (none: every layer)."""
    doc = (family.sparse_layers.__doc__ or "").strip().splitlines()
    return doc[0].partition(": ")[2].rstrip(".").replace("``", "`") if doc else "every layer"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def family_table(families: Sequence[MoEFamily] = DESCRIPTORS) -> str:
    """The Markdown table: one row per descriptor, with what works on it."""
    rows = [family_support(family) for family in families]
    capabilities = list(rows[0].checks) if rows else []
    header = ["`model_type`", "family", "routing", "sparse layers", "experts", "shared experts", *capabilities]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        family = row.family
        attrs = (*family.shared_expert_attrs, *(f"layer.{attr}" for attr in family.layer_shared_expert_attrs))
        shared = ", ".join(f"`{attr}`" for attr in attrs) or "-"
        cells = [
            f"`{family.model_type}`",
            family.display_name,
            family.routing,
            _sparse_layers(family),
            _experts(family),
            shared,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in [*cells, *row.checks.values()]) + " |")
    return "\n".join(lines)


def write_family_table(path: str | Path, table: str | None = None) -> Path:
    """Replace the part of ``path`` between :data:`BEGIN` and :data:`END` with the family table (atomically)."""
    target = Path(path)
    if not target.is_file():
        raise FedExpertsError(f"{target} does not exist: --write rewrites the family table of an existing file")
    text = target.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise FedExpertsError(f"{target} has no family table part: put the lines {BEGIN} and {END} where it goes")
    rendered = family_table() if table is None else table
    updated = text[: start + len(BEGIN)] + "\n\n" + rendered + "\n\n" + text[end:]
    with atomic_file(target) as staging:
        staging.write_text(updated, encoding="utf-8")
    return target


def table_in(path: str | Path) -> str:
    """The family table currently between the markers of ``path`` (what :func:`write_family_table` wrote)."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise FedExpertsError(f"{path} has no family table part ({BEGIN} ... {END})")
    return text[start + len(BEGIN) : end].strip()

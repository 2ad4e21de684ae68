"""A fedexperts folder for what no stock config describes: grafted personal experts, per-layer expert counts.

It is a pruned-model folder (:func:`fedexperts.moe.surgery.write_pruned`: the stock ``config.json``
of the family, every tensor in the model's own naming in ``fedexperts_model.safetensors``, and the
kept experts' global indices) plus, in the export's ``fedexperts_export.json``, the grafts: per
layer, which experts the personal slots copied and whether the gate has a bias. Any LoRA is merged
first, so the folder holds plain weights. :func:`load_personalized` rebuilds the model with
fedexperts' own surgery: the family's transformers class on the meta device, pruned to the saved
counts, grafted, then filled from the weights file (strictly: every tensor, nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedexperts.errors import FedExpertsError
from fedexperts.export.manifest import PERSONALIZED, read_manifest
from fedexperts.models.load import resolve_dtype
from fedexperts.moe.personal import graft_personal_experts, grafts
from fedexperts.moe.surgery import load_pruned, write_pruned

GRAFTS_KEY = "grafts"


def graft_layout(model: PreTrainedModel) -> dict[str, dict[str, Any]]:
    """Per grafted layer: the experts its personal slots copied and whether its gate has a bias."""
    return {
        name: {"experts": list(graft.experts), "gate_bias": graft.gate_bias} for name, graft in grafts(model).items()
    }


def write_personalized(model: PreTrainedModel, folder: Path, *, dtype: torch.dtype) -> dict[str, Any]:
    """Write ``model`` (no LoRA left) into ``folder`` in ``dtype``; the manifest entries it needs."""
    movable: Any = model  # transformers types its wrapper of ``nn.Module.to`` in a way mypy cannot call
    movable.to(dtype)
    model.config.dtype = dtype
    write_pruned(model, folder)
    return {GRAFTS_KEY: graft_layout(model)}


def _graft(layout: Mapping[str, Any], where: Path) -> Any:
    def attach(model: PreTrainedModel) -> None:
        try:
            for name, entry in layout.items():
                experts = [int(index) for index in entry["experts"]]
                graft_personal_experts(model, {name: experts}, gate_bias=bool(entry["gate_bias"]))
        except (KeyError, TypeError, ValueError) as error:
            raise FedExpertsError(f"{where}: malformed {GRAFTS_KEY!r} entry ({error})") from None

    return attach


def load_personalized(
    folder: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The model of a personalized export folder, in eval mode (``dtype``: the folder's own by default)."""
    source = Path(folder)
    manifest = read_manifest(source)
    if manifest.get("kind") != PERSONALIZED:
        raise FedExpertsError(
            f"{source} holds a stock Hugging Face model, not a personalized one: load it with "
            "transformers' AutoModelForCausalLM.from_pretrained (or fedexperts.load_exported)"
        )
    layout = manifest.get(GRAFTS_KEY, {})
    if not isinstance(layout, dict):
        raise FedExpertsError(f"{source}: malformed {GRAFTS_KEY!r} entry (expected an object of layers)")
    chosen = resolve_dtype(dtype or str(manifest.get("dtype", "float32")))
    model = load_pruned(
        source, dtype=chosen if isinstance(chosen, torch.dtype) else None, prepare=_graft(layout, source)
    )
    moved: Any = model
    loaded: PreTrainedModel = moved.to(device).eval()
    return loaded

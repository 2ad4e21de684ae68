"""Export a run's client model (or its global model) as a folder a user can ship.

Which folder comes out is decided by the model, never by the algorithm's name: a model that a
stock transformers config describes (no grafted experts; one expert count in every MoE layer) is
a standard Hugging Face checkpoint (:mod:`fedexperts.export.hf`), LoRA merged or saved as a PEFT
adapter; anything else is a personalized folder (:mod:`fedexperts.export.personalized`) with every
LoRA merged. Both get the tokenizer, ``fedexperts_export.json`` and a model card (``README.md``).

The folder is written beside ``out`` and renamed into place at the end, so a failed export leaves
nothing behind; ``out`` must be new or an empty folder, and nothing already there is deleted.

Weights are written in ``dtype``: by default the run's ``model.dtype`` (``auto``: the dtype the
base loaded in). A half dtype rounds the float32 trained values, merged LoRA deltas included; pass
``float32`` to keep them exactly.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from fedexperts.atomic import atomic_new_directory
from fedexperts.errors import FedExpertsError
from fedexperts.export.assemble import Assembled, assemble_client, assemble_global
from fedexperts.export.card import CardFacts, card_metrics, model_card
from fedexperts.export.hf import write_stock
from fedexperts.export.lora import keep_one_adapter, lora_layers, merge_lora, take_adapter
from fedexperts.export.manifest import PERSONALIZED, STOCK, write_manifest
from fedexperts.export.personalized import write_personalized
from fedexperts.export.source import check_out, open_run
from fedexperts.models.load import resolve_dtype
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.personal import grafts, merge_personal_lora
from fedexperts.moe.precision import compute_dtype
from fedexperts.moe.surgery import expert_map, stock_config

LoraMode = Literal["merged", "adapter"]
CARD_FILE = "README.md"


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    kind: str
    """``stock`` (a Hugging Face checkpoint) or ``personalized`` (for :func:`load_personalized`)."""
    lora: str | None
    """``merged``, ``adapter`` or ``None`` (the model has no LoRA)."""
    dtype: str


def export_client(
    run_dir: str | Path,
    client_id: str,
    out: str | Path,
    *,
    lora: LoraMode = "merged",
    dtype: str | None = None,
) -> ExportResult:
    """Write ``client_id``'s model from the run in ``run_dir`` into the new folder ``out`` (module docstring)."""
    folder = check_out(out)
    source = open_run(run_dir)
    source.client_index(client_id)
    return write_export(assemble_client(source, client_id), folder, lora=lora, dtype=dtype)


def export_global(
    run_dir: str | Path, out: str | Path, *, lora: LoraMode = "merged", dtype: str | None = None
) -> ExportResult:
    """Write the run's shared model (the last global state on the base, no personal parts) into ``out``."""
    folder = check_out(out)
    return write_export(assemble_global(open_run(run_dir)), folder, lora=lora, dtype=dtype)


def _dtype(assembled: Assembled, model: PreTrainedModel, dtype: str | None) -> torch.dtype:
    chosen = resolve_dtype(dtype or assembled.source.config.model.dtype)
    if isinstance(chosen, torch.dtype):
        return chosen
    return compute_dtype(model) or torch.float32  # auto: the dtype the base loaded in


def _who(assembled: Assembled) -> str:
    return "the global model" if assembled.client_id is None else f"{assembled.client_id}'s model"


def write_export(
    assembled: Assembled, out: Path, *, lora: LoraMode = "merged", dtype: str | None = None
) -> ExportResult:
    """Write an assembled model as its folder (the model is changed on the way: LoRA merged or taken out)."""
    if lora not in ("merged", "adapter"):
        raise FedExpertsError(f"--lora {lora!r}: choose merged or adapter")
    model: PreTrainedModel = unwrap_model(assembled.model)
    chosen = _dtype(assembled, model, dtype)
    config = None if grafts(model) else stock_config(model)
    if config is None and lora == "adapter":
        raise FedExpertsError(
            f"--lora adapter: {_who(assembled)} ({assembled.setting.algorithm.name}) is not a stock architecture "
            "(grafted experts or per-layer expert counts), so its folder holds the LoRA merged; drop --lora adapter"
        )
    keep_one_adapter(model, _who(assembled), client=assembled.client_id is not None)
    had_lora = any(True for _ in lora_layers(model))
    adapter = take_adapter(model) if lora == "adapter" else None
    if lora == "adapter" and adapter is None:
        raise FedExpertsError(f"--lora adapter: {_who(assembled)} has no LoRA to save as an adapter")
    merge_personal_lora(model)
    merge_lora(model)
    kind = STOCK if config is not None else PERSONALIZED
    entries: dict[str, Any] = {}
    try:
        with atomic_new_directory(out) as staging:
            if config is not None:
                write_stock(model, config, staging, dtype=chosen, adapter=adapter)
            else:
                entries = write_personalized(model, staging, dtype=chosen)
            assembled.tokenizer.save_pretrained(staging)
            facts = _facts(assembled, model, kind, ("adapter" if adapter else "merged") if had_lora else None, chosen)
            origin = {"algorithm": facts.algorithm, "client": facts.client, "run": facts.run_name}
            write_manifest(
                staging, {**entries, **origin, "kind": kind, "dtype": facts.dtype, "template": facts.template}
            )
            text = model_card(facts, card_metrics(assembled.source.record, assembled.client_id))
            (staging / CARD_FILE).write_text(text, encoding="utf-8")
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FedExpertsError(f"--out {out} is no longer a new or empty folder; nothing was written") from None
        raise
    return ExportResult(out, kind, facts.lora, facts.dtype)


def _facts(assembled: Assembled, model: PreTrainedModel, kind: str, lora: str | None, dtype: torch.dtype) -> CardFacts:
    source, config = assembled.source, assembled.source.config
    mapping = expert_map(model)
    pruned = any(len(kept) != mapping.num_global[name] for name, kept in mapping.local_to_global.items())
    grafted = {name: list(graft.experts) for name, graft in grafts(model).items()}
    return CardFacts(
        kind=kind,
        base_model=config.model.name,
        algorithm=str(config.algorithm.name),
        algorithm_settings=config.algorithm.model_dump(mode="json"),
        run_name=config.name,
        run_dir=source.run_dir.name,
        client=assembled.client_id,
        rounds_done=source.rounds_done,
        rounds=config.federation.rounds,
        lora=lora,
        dtype=str(dtype).removeprefix("torch."),
        template=assembled.template.kind,
        experts={name: list(kept) for name, kept in mapping.local_to_global.items()} if pruned else None,
        grafts=grafted or None,
    )

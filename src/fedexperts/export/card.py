"""The model card (``README.md``) written beside every export: base model, algorithm, run, client, metrics.

The metrics are the run's own: for a client, its final evaluation (own test split, union test set,
probes, MMLU) or, for a run that has not finished, its last evaluated round; for the global model,
the means over clients of their final models (the run scores client models, not the global one).
Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedexperts.export.manifest import PERSONALIZED
from fedexperts.reporting.runs import MeanScores, RunRecord
from fedexperts.reporting.schema import Scores

_SCORE_FIELDS = ("rouge_l", "exact_match", "token_f1", "loss")


@dataclass(frozen=True)
class CardFacts:
    kind: str
    """``stock`` or ``personalized`` (:mod:`fedexperts.export.manifest`)."""
    base_model: str
    algorithm: str
    algorithm_settings: Mapping[str, Any]
    run_name: str
    run_dir: str
    client: str | None
    """``None``: the global model."""
    rounds_done: int
    rounds: int
    lora: str | None
    """``merged``, ``adapter`` or ``None`` (the model has no LoRA)."""
    dtype: str
    template: str
    experts: Mapping[str, Sequence[int]] | None = None
    """The global experts each MoE layer keeps, when the model is a sub-MoE."""
    grafts: Mapping[str, Sequence[int]] | None = None
    """The pretrained experts each layer's personal slots copied (FLEx)."""


def _scores(scores: Scores | MeanScores | None) -> str | None:
    if scores is None:
        return None
    values = {name: getattr(scores, name) for name in _SCORE_FIELDS}
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items() if value is not None)


def card_metrics(record: RunRecord, client: str | None) -> list[tuple[str, str]]:
    """``(what, scores)`` rows for the card (see the module docstring)."""
    rows: list[tuple[str, str | None]] = []
    if client is None:
        rows += [
            ("final client models on their own test splits (mean)", _scores(record.personalized)),
            ("final client models on the union test set (mean)", _scores(record.union)),
        ]
        probes = record.probes
        rows.append(("knowledge probes (mean accuracy)", None if probes is None else f"{probes:.4f}"))
    elif record.final is not None and client in record.final.clients:
        final = record.final.clients[client]
        rows += [("own test split (final)", _scores(final.own)), ("union test set (final)", _scores(final.union))]
        rows.append(("knowledge probes (accuracy)", None if final.probes is None else f"{final.probes:.4f}"))
        rows.append(("MMLU (accuracy)", None if final.mmlu is None else f"{final.mmlu.overall:.4f}"))
    else:
        evaluated = [r for r in record.rounds if client in r.clients and r.clients[client].eval is not None]
        if evaluated:
            last = evaluated[-1]
            rows.append((f"own test split (start of round {last.round})", _scores(last.clients[client].eval)))
    return [(what, value) for what, value in rows if value]


def _load_snippet(facts: CardFacts) -> str:
    if facts.kind == PERSONALIZED:
        lines = ["import fedexperts", "", 'model = fedexperts.load_personalized("FOLDER")  # FOLDER: this folder']
        return "\n".join([*lines, 'print(fedexperts.generate("FOLDER", "Your instruction"))'])
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("FOLDER")  # FOLDER: this folder',
        'tokenizer = AutoTokenizer.from_pretrained("FOLDER")',
    ]
    if facts.lora == "adapter":
        lines[1:1] = ["from peft import PeftModel"]
        lines.append('model = PeftModel.from_pretrained(model, "FOLDER/adapter")  # the LoRA, unmerged')
    return "\n".join(lines)


def model_card(facts: CardFacts, metrics: Sequence[tuple[str, str]]) -> str:
    """The card's Markdown, with a Hugging Face metadata header."""
    whose = "the global (shared) model" if facts.client is None else f"client `{facts.client}`"
    library = "fedexperts" if facts.kind == PERSONALIZED else "transformers"
    header = [
        "---",
        f"library_name: {library}",
        "tags:",
        "- fedexperts",
        "- federated-learning",
        "- mixture-of-experts",
    ]
    header += [f"- {facts.algorithm}", "---", ""]
    state = f"after round {facts.rounds_done} of {facts.rounds}" + (
        ", the last (the model of the final evaluation)" if facts.rounds_done >= facts.rounds else " (unfinished)"
    )
    lora = {"merged": "merged into the weights", "adapter": "a PEFT adapter in `adapter/`", None: "none"}[facts.lora]
    body = [
        f"# {facts.run_name}: {whose}",
        "",
        f"Exported by fedexperts from the run `{facts.run_dir}`, {state}.",
        "",
        f"- base model: `{facts.base_model}`",
        f"- algorithm: `{facts.algorithm}`",
        f"- folder: {'personalized (fedexperts)' if facts.kind == PERSONALIZED else 'stock Hugging Face checkpoint'}",
        f"- LoRA: {lora}",
        f"- weights: {facts.dtype}",
        f"- prompts: the {facts.template} template, as in training (`fedexperts generate` applies it)",
    ]
    if facts.experts is not None:
        body.append(f"- kept experts (global indices): `{json.dumps(dict(facts.experts))}`")
    if facts.grafts is not None:
        body.append(f"- personal experts copied from: `{json.dumps(dict(facts.grafts))}`")
    body += ["", "## Metrics", ""]
    body += [f"- {what}: {value}" for what, value in metrics] or ["- none recorded"]
    body += ["", "## Use", "", "```python", _load_snippet(facts), "```", ""]
    body += ["```bash", 'fedexperts generate FOLDER "Your instruction"', "```", ""]
    settings = json.dumps(dict(facts.algorithm_settings), indent=2, sort_keys=True)
    body += ["## Algorithm settings", "", "```json", settings, "```", ""]
    return "\n".join(header + body)

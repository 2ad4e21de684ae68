"""Routing analysis of a finished run: which experts each client's final model uses, per category.

Each client's model is rebuilt exactly as the runtime builds it (final global state from the last
checkpoint, the algorithm's server state, the client's personal state) and run on every
category's pooled test rows. Two figures come out: per-client expert usage heatmaps (layer x
global expert, over the client's own test rows) and, for FLEx, how far each client's personal
gate opens (mean sigmoid over real tokens) per category and layer.
"""

from __future__ import annotations

import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fedexperts.config import build_config
from fedexperts.data.layout import batch_layout
from fedexperts.data.tokenize import tokenize_instructions
from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import pad_token_id
from fedexperts.experiment import Setting, build_setting, federated_rows, token_rows
from fedexperts.federation.client import row_batches
from fedexperts.federation.server import restore_checkpoint
from fedexperts.federation.state import CheckpointStore, ClientStateStore
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.moe.families import moe_layers, unwrap_model
from fedexperts.moe.personal import PERSONAL_GATE, grafts
from fedexperts.moe.precision import autocast_for
from fedexperts.moe.routing import RoutingRecorder
from fedexperts.moe.surgery import expert_map
from fedexperts.reporting.schema import CONFIG_FILE
from fedexperts.runfiles import tracked_writes

GATE_ROWS_PER_CATEGORY = 32


def _final_state(run_dir: Path, setting: Setting) -> dict[str, torch.Tensor]:
    latest = CheckpointStore(run_dir / "checkpoints").latest()
    if latest is None:
        raise FedExpertsError(f"{run_dir} has no checkpoint: nothing to analyse")
    return restore_checkpoint(latest[1], setting.algorithm)


def _category_rows(splits: Any, setting: Setting) -> dict[str, list[dict[str, list[int]]]]:
    """Every client's test rows pooled by category (at most ``GATE_ROWS_PER_CATEGORY`` each), tokenized once."""
    by_category: dict[str, list[dict[str, list[int]]]] = defaultdict(list)
    for split in splits:
        tokens = tokenize_instructions(
            split.test,
            setting.tokenizer,
            max_length=setting.config.data.max_length,
            template=setting.template.kind,
            layout=setting.layout,
        )
        for row, category in zip(token_rows(tokens.dataset), tokens.dataset["category"], strict=True):
            by_category[str(category)].append(row)
    return {category: rows[:GATE_ROWS_PER_CATEGORY] for category, rows in sorted(by_category.items())}


@torch.no_grad()
def analyse_run(run_dir: str | Path) -> dict[str, Any]:
    """Per client: expert usage per layer over its own test rows (``usage``: layer x global expert), the
    experts its model holds (``held``), and for FLEx the gate opening per category and layer (``gates``)."""
    folder = Path(run_dir)
    try:
        config = build_config(tomllib.loads((folder / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise FedExpertsError(f"{folder} holds no run ({CONFIG_FILE} missing)") from None
    setting = build_setting(config)
    global_state = _final_state(folder, setting)
    store = ClientStateStore(folder / "clients")
    tokenizer = setting.tokenizer
    pad = pad_token_id(tokenizer)
    category_rows: dict[str, list[dict[str, list[int]]]] | None = None
    usage: dict[str, torch.Tensor] = {}
    held: dict[str, dict[str, list[int]]] = {}
    gates: dict[str, dict[str, list[float]]] = {}
    for client in setting.clients:
        info = ClientInfo(client.client_id, client.num_examples)
        received = setting.algorithm.downlink(global_state, info)
        context = setting.algorithm.setup_client(
            setting.model, received, store.load(client.client_id), LocalData(info, round=config.federation.rounds + 1)
        )
        model = context.model
        base = unwrap_model(model)
        device = next(base.parameters()).device
        experts = expert_map(base)
        layers = moe_layers(base)
        layout = batch_layout(base)
        with RoutingRecorder(base) as recorder:
            for batch in row_batches(client.test.rows, pad, batch_size=16):
                inputs = layout.model_inputs(base, {key: value.to(device) for key, value in batch.items()})
                masks = recorder.mask(inputs["attention_mask"], inputs.get("decoder_attention_mask"))
                with masks, autocast_for(base):
                    base(**inputs)
        counts = recorder.counts()
        table = torch.zeros(len(layers), max(experts.num_global.values()))
        for row, layer in enumerate(layers):
            share = counts[layer.name].double() / counts[layer.name].sum().clamp_min(1)
            for local, value in enumerate(share.tolist()):
                table[row, experts.global_index(layer.name, local)] = value
        usage[client.client_id] = table
        held[client.client_id] = {name: list(indices) for name, indices in experts.local_to_global.items()}
        if grafts(base):
            if category_rows is None:
                category_rows = _category_rows(federated_rows(config)[0].clients, setting)
            gates[client.client_id] = _gate_openings(base, category_rows, pad, device)
    return {
        "usage": usage,
        "held": held,
        "gates": gates,
        "layers": [layer.name for layer in moe_layers(setting.loaded.model)],
    }


def _gate_openings(
    base: Any, category_rows: dict[str, list[dict[str, list[int]]]], pad: int, device: Any
) -> dict[str, list[float]]:
    """Mean sigmoid of the personal gate over real tokens of each category's pooled test rows, per layer."""
    sums: dict[str, list[float]] = defaultdict(list)
    layout = batch_layout(base)
    stacks = {layer.name: layer.stack for layer in moe_layers(base)}
    names = list(grafts(base))
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        return lambda module, args, output: captured.__setitem__(name, torch.sigmoid(output.float()).mean(dim=-1))

    handles = [base.get_submodule(f"{name}.{PERSONAL_GATE}").register_forward_hook(hook_for(name)) for name in names]
    try:
        for category, rows in category_rows.items():
            totals = torch.zeros(len(names))
            real = torch.zeros(len(names))
            for batch in row_batches(rows, pad, batch_size=16):
                captured.clear()
                inputs = layout.model_inputs(base, {key: value.to(device) for key, value in batch.items()})
                masks = layout.stack_masks(inputs)  # an encoder-decoder's decoder layers see the responses
                with autocast_for(base):
                    base(**inputs)
                for index, name in enumerate(names):
                    mask = masks[stacks[name]]
                    opening = captured[name].reshape(-1)
                    totals[index] += float(opening[mask.reshape(-1).bool().to(opening.device)].sum())
                    real[index] += int(mask.sum())
            sums[category] = (totals / real.clamp_min(1)).tolist()
    finally:
        for handle in handles:
            handle.remove()
    return dict(sums)


def plot_analysis(analysis: dict[str, Any], folder: str | Path) -> list[Path]:
    """``routing_usage.png`` (a heatmap per client) and, for FLEx, ``gate_openings.png``; a run lists them."""
    target = Path(folder)
    paths = [target / "routing_usage.png", *([target / "gate_openings.png"] if analysis["gates"] else [])]
    with tracked_writes(target, *paths):
        return _plot_analysis(analysis, *paths)


def _plot_analysis(analysis: dict[str, Any], usage_path: Path, gates_path: Path | None = None) -> list[Path]:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fedexperts.atomic import atomic_file

    written = []
    usage = analysis["usage"]
    figure = Figure(figsize=(2.6 * len(usage) + 1.5, 3.4))
    FigureCanvasAgg(figure)
    largest = max(max(float(table.max()) for table in usage.values()), 1e-9)  # one scale for every client
    for position, (client, table) in enumerate(sorted(usage.items()), start=1):
        axes = figure.add_subplot(1, len(usage), position)
        image = axes.imshow(table.numpy(), vmin=0, vmax=largest, cmap="viridis", aspect="auto")
        axes.set_title(client, fontsize="small")
        axes.set_xlabel("expert")
        axes.set_yticks(range(table.shape[0]))
        axes.set_ylabel("MoE layer" if position == 1 else "")
    figure.suptitle("routing usage: share of each layer's tokens per expert, final model of each client")
    figure.subplots_adjust(top=0.8)  # room for the title above the clients' own
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="share of tokens")
    with atomic_file(usage_path) as path:
        figure.savefig(path, dpi=110, format="png", bbox_inches="tight")
    written.append(usage_path)
    gates = analysis["gates"]
    if gates and gates_path is not None:
        categories = sorted({category for per_client in gates.values() for category in per_client})
        figure = Figure(figsize=(1.2 * len(categories) + 3, 0.45 * len(gates) + 1.8))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        clients = sorted(gates)
        values = np.array([[np.mean(gates[c].get(k, [np.nan])) for k in categories] for c in clients])
        image = axes.imshow(values, vmin=0, vmax=1, cmap="magma", aspect="auto")
        axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize="small")
        axes.set_yticks(range(len(clients)), clients, fontsize="small")
        axes.set_title("FLEx personal gate opening (mean sigmoid over tokens and layers)")
        figure.colorbar(image, ax=axes)
        with atomic_file(gates_path) as path:
            figure.savefig(path, dpi=110, format="png", bbox_inches="tight")
        written.append(gates_path)
    return written

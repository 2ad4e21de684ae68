"""Charts of the built-in model: the per-category routing heatmap saved next to its model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedexperts.data.expertbench import CATEGORIES


def plot_routing(metrics: dict[str, Any], path: Path) -> None:
    """Heatmap of each category's expert distribution, one panel per MoE layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    distributions = torch.tensor(metrics["routing_distributions"])  # (categories, layers, experts)
    layers = metrics["routing_layers"]
    figure = Figure(figsize=(2.6 * len(layers) + 1.5, 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    image = None
    for index, (ax, name) in enumerate(zip(axes, layers, strict=True)):
        image = ax.imshow(distributions[:, index, :].numpy(), vmin=0, vmax=float(distributions.max()), cmap="viridis")
        ax.set_title(name.replace("model.layers.", "layer ").replace(".mlp", ""), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(distributions.shape[-1]))
        ax.set_yticks(range(len(CATEGORIES)), CATEGORIES if index == 0 else [""] * len(CATEGORIES), fontsize=8)
    assert image is not None
    figure.suptitle("built-in model: share of routed tokens per expert, by task category")
    figure.colorbar(image, ax=list(axes), fraction=0.02, label="share of routed tokens")
    figure.savefig(path, dpi=120, bbox_inches="tight")

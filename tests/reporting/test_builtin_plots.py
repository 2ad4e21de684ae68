from fedexperts.data.expertbench import CATEGORIES
from fedexperts.reporting.builtin_plots import plot_routing


def test_routing_heatmap_is_a_png_with_one_panel_per_layer(tmp_path):
    layers = ["model.layers.0.mlp", "model.layers.1.mlp"]
    uniform = [[1 / 4] * 4 for _ in layers]
    metrics = {"routing_layers": layers, "routing_distributions": [uniform for _ in CATEGORIES]}
    path = tmp_path / "routing.png"
    plot_routing(metrics, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

import torch

from fedexperts.analysis import analyse_run, plot_analysis
from fedexperts.federation.inprocess import run_experiment


def test_flex_run_analysis_has_usage_per_layer_and_gate_openings(micro_config):
    result = run_experiment(micro_config("algorithm.name=flex", "federation.rounds=1", "eval.every=0"))
    analysis = analyse_run(result.run_dir)
    assert sorted(analysis["usage"]) == ["client-0", "client-1", "client-2"]
    for table in analysis["usage"].values():
        torch.testing.assert_close(table.sum(dim=1), torch.ones(table.shape[0]), rtol=0, atol=1e-6)
    for per_category in analysis["gates"].values():
        assert per_category and all(0 < value < 1 for values in per_category.values() for value in values)
    written = plot_analysis(analysis, result.run_dir)
    assert [path.name for path in written] == ["routing_usage.png", "gate_openings.png"]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in written)


def test_fedmoe_usage_is_zero_on_experts_a_client_does_not_hold(micro_config):
    overrides = ("algorithm.name=fedmoe", "algorithm.fedmoe.warmup_rounds=0", "federation.rounds=2", "eval.every=0")
    result = run_experiment(micro_config(*overrides))
    analysis = analyse_run(result.run_dir)
    assert not analysis["gates"]
    layers = analysis["layers"]
    sizes = []
    for client, table in analysis["usage"].items():
        for row, layer in enumerate(layers):
            held = analysis["held"][client][layer]
            outside = [expert for expert in range(table.shape[1]) if expert not in held]
            assert float(table[row, outside].sum()) == 0.0
            sizes.append(len(held))
    assert min(sizes) < table.shape[1]  # clients without a full-model budget hold a sub-MoE

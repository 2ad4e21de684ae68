import random
from fractions import Fraction

import pytest
import torch

from fedexperts.algorithms.fedmoe_core import (
    Action,
    ExpertUpdate,
    RecommendationState,
    aggregate_fedmoe,
    choose_sub_moe,
    choose_sub_moe_exact,
    estimate_activation,
    expert_and_dense_bytes,
    modular_average,
    random_sub_moe,
    recommend,
)
from fedexperts.errors import FedExpertsError
from fedexperts.models import tiny_model
from fedexperts.moe import moe_layers, select_experts

# -- stage 1: sub-MoE search ------------------------------------------------------------------------


def vectors(*rows):
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


# layer 0 by share: expert 0 (.5), 1 (.3), 2 (.2), 3 (0): cumulative .5, .8, 1, 1
# layer 1 by share: expert 1 (.6), 2 (.3), 0 (.1): cumulative .6, .9, 1
# memory = 1000 + 10 * kept_0 + 100 * kept_1:
#   theta 0 .. .5 -> (1, 1) = 1110; .5 .. .6 -> (2, 1) = 1120; .6 .. .8 -> (2, 2) = 1220;
#   .8 .. .9 -> (3, 2) = 1230; .9 .. 1 -> (3, 3) = 1330; whole model (4, 3) = 1340
HAND = {"activation": vectors([5, 3, 2, 0], [1, 6, 3]), "dense_bytes": 1000, "expert_bytes": [10, 100]}


@pytest.mark.parametrize(
    ("budget", "theta", "kept", "memory"),
    [
        (1110, 0.5, ((0,), (1,)), 1110),
        (1119, 0.5, ((0,), (1,)), 1110),
        (1120, 0.6, ((0, 1), (1,)), 1120),
        (1229, 0.8, ((0, 1), (1, 2)), 1220),
        (1230, 0.9, ((0, 1, 2), (1, 2)), 1230),
        (1339, 1.0, ((0, 1, 2), (0, 1, 2)), 1330),
        (1340, 1.0, ((0, 1, 2, 3), (0, 1, 2)), 1340),
        (10**9, 1.0, ((0, 1, 2, 3), (0, 1, 2)), 1340),
    ],
)
@pytest.mark.parametrize("search", [choose_sub_moe, choose_sub_moe_exact])
def test_hand_worked_sub_moe(search, budget, theta, kept, memory):
    choice = search(**HAND, budget_bytes=budget, min_experts=[1, 1])
    assert choice.theta == pytest.approx(theta)
    assert choice.kept == kept
    assert choice.memory_bytes == memory
    assert choice.counts == [len(k) for k in kept]


def test_min_experts_and_unnormalised_activation():
    # the recorder's fractions sum to top-k: scaling a layer changes nothing
    scaled = {**HAND, "activation": [HAND["activation"][0] * 0.2, HAND["activation"][1] * 7]}
    choice = choose_sub_moe(**scaled, budget_bytes=1125, min_experts=[2, 1])
    assert choice.kept == ((0, 1), (1,)) and choice.theta == pytest.approx(0.6)
    # min_experts lifts the smallest sub-MoE: (2, 2) experts at theta = 0 .. .8
    choice = choose_sub_moe(**HAND, budget_bytes=1229, min_experts=[2, 2])
    assert choice.kept == ((0, 1), (1, 2)) and choice.memory_bytes == 1220


def test_budget_below_the_minimum_is_refused_with_the_numbers():
    with pytest.raises(FedExpertsError, match=r"1109 bytes.*1000 bytes.*1110 bytes"):
        choose_sub_moe(**HAND, budget_bytes=1109, min_experts=[1, 1])
    with pytest.raises(FedExpertsError, match=r"1219 bytes.*1000 bytes.*1220 bytes"):
        choose_sub_moe_exact(**HAND, budget_bytes=1219, min_experts=[2, 2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": vectors([1, -1], [1, 1])}, "non-negative"),
        ({"activation": vectors([0, 0], [1, 1])}, "all zero"),
        ({"activation": vectors([[1, 1]], [1, 1])}, "1-D"),
        ({"expert_bytes": [1]}, "same layers"),
        ({"min_experts": [1, 3]}, "between 1 and 2"),
        ({"min_experts": [0, 1]}, "between 1 and 2"),
        ({"dense_bytes": -1}, "non-negative"),
        ({"tolerance": 0.0}, "tolerance"),
    ],
)
def test_bad_search_arguments(change, message):
    arguments = {
        "activation": vectors([1, 1], [1, 1]),
        "budget_bytes": 100,
        "dense_bytes": 0,
        "expert_bytes": [1, 1],
        "min_experts": [1, 1],
        **change,
    }
    with pytest.raises(FedExpertsError, match=message):
        choose_sub_moe(**arguments)


def brute_force(weights, budget, dense, sizes, minimum):
    """Independent reference in exact rational arithmetic: every theta where a kept set can change."""
    orders, cumulative = [], []
    for row in weights:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        total, running, shares = sum(row), 0, []
        for i in order:
            running += row[i]
            shares.append(Fraction(running, total))
        orders.append(order)
        cumulative.append(shares)

    def kept_at(theta):
        kept = []
        for order, shares, least in zip(orders, cumulative, minimum, strict=True):
            count = 0 if theta == 0 else next(m + 1 for m, share in enumerate(shares) if share >= theta)
            kept.append(tuple(sorted(order[: max(count, least)])))
        return tuple(kept)

    def memory(kept):
        return dense + sum(len(k) * size for k, size in zip(kept, sizes, strict=True))

    full = tuple(tuple(range(len(row))) for row in weights)
    if budget >= memory(full):
        return Fraction(1), full, memory(full)
    candidates = {Fraction(0), Fraction(1)} | {share for shares in cumulative for share in shares}
    fitting = [theta for theta in candidates if memory(kept_at(theta)) <= budget]
    if not fitting:
        return None
    best = max(fitting)
    return best, kept_at(best), memory(kept_at(best))


def random_case(rng):
    """3 layers of 4-6 experts with small integer weights (exact ties and shared breakpoints happen)."""
    weights = []
    for _ in range(3):
        row = [rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(rng.randint(4, 6))]
        if sum(row) == 0:
            row[rng.randrange(len(row))] = 1
        weights.append(row)
    sizes = [rng.randint(0, 40) for _ in weights]
    minimum = [rng.randint(1, 2) for _ in weights]
    dense = rng.randint(0, 100)
    return weights, sizes, minimum, dense


def memory_levels(weights, sizes, minimum, dense):
    """Every memory a threshold can give, and the whole model's."""
    levels = set()
    for counts in _prefix_counts(weights, minimum):
        levels.add(dense + sum(c * s for c, s in zip(counts, sizes, strict=True)))
    return sorted(levels)


def _prefix_counts(weights, minimum):
    grid = [[]]
    for row, least in zip(weights, minimum, strict=True):
        grid = [[*counts, c] for counts in grid for c in range(least, len(row) + 1)]
    return grid


def test_bisection_matches_exact_and_brute_force_on_random_tiny_cases():
    rng = random.Random(1234)
    checked = 0
    for _ in range(150):
        weights, sizes, minimum, dense = random_case(rng)
        levels = memory_levels(weights, sizes, minimum, dense)
        budgets = {levels[0] - 1, levels[-1], levels[-1] + 5}
        budgets |= set(rng.sample(levels, min(4, len(levels))))  # budgets exactly at a memory level
        budgets |= {rng.randint(levels[0], levels[-1]) for _ in range(3)}
        arguments = {
            "activation": [torch.tensor(row, dtype=torch.float64) for row in weights],
            "dense_bytes": dense,
            "expert_bytes": sizes,
            "min_experts": minimum,
        }
        for budget in sorted(budgets):
            expected = brute_force(weights, budget, dense, sizes, minimum)
            if expected is None:
                with pytest.raises(FedExpertsError, match="too small"):
                    choose_sub_moe(**arguments, budget_bytes=budget)
                continue
            theta, kept, memory = expected
            exact = choose_sub_moe_exact(**arguments, budget_bytes=budget)
            assert (exact.kept, exact.memory_bytes) == (kept, memory) and memory <= budget
            assert exact.theta == pytest.approx(float(theta), abs=1e-12)
            # 1.0: no bisection step at all; 0.3: a wide bracket with several breakpoints left
            for tolerance in (1e-4, 1e-12, 0.3, 1.0):
                assert choose_sub_moe(**arguments, budget_bytes=budget, tolerance=tolerance) == exact
            checked += 1
    assert checked > 1000


def test_bisection_matches_exact_on_continuous_activations():
    generator = torch.Generator().manual_seed(0)
    for case in range(100):
        activation = [torch.rand(int(n), generator=generator, dtype=torch.float64) ** 3 for n in (8, 6, 8, 5)]
        sizes, dense = [7, 11, 5, 13], 500
        full = dense + sum(len(a) * s for a, s in zip(activation, sizes, strict=True))
        arguments = {"activation": activation, "dense_bytes": dense, "expert_bytes": sizes, "min_experts": [2] * 4}
        budget = 500 + 2 * sum(sizes) + case * (full - 500 - 2 * sum(sizes)) // 99
        bisected = choose_sub_moe(**arguments, budget_bytes=budget)
        assert bisected == choose_sub_moe_exact(**arguments, budget_bytes=budget)


def test_a_larger_budget_never_keeps_less():
    arguments = {**HAND, "min_experts": [1, 1]}
    previous = None
    for budget in range(1110, 1400, 3):
        choice = choose_sub_moe(**arguments, budget_bytes=budget)
        if previous is not None:
            assert choice.theta >= previous.theta
            assert all(set(old) <= set(new) for old, new in zip(previous.kept, choice.kept, strict=True))
        previous = choice


def test_random_sub_moe_has_the_given_sizes():
    first = random_sub_moe([8, 6, 4], [3, 6, 1], seed=7)
    assert [len(layer) for layer in first] == [3, 6, 1]
    assert all(
        layer == sorted(set(layer)) and all(0 <= i < n for i in layer)
        for layer, n in zip(first, [8, 6, 4], strict=True)
    )
    assert first[1] == [0, 1, 2, 3, 4, 5]
    assert random_sub_moe([8, 6, 4], [3, 6, 1], seed=7) == first
    draws = {tuple(random_sub_moe([8], [3], seed=seed)[0]) for seed in range(20)}
    assert len(draws) > 5
    with pytest.raises(FedExpertsError, match="cannot keep 9 of 8"):
        random_sub_moe([8], [9], seed=0)
    with pytest.raises(FedExpertsError, match="kept counts"):
        random_sub_moe([8, 8], [2], seed=0)


# -- byte sizes of a real model --------------------------------------------------------------------


def test_expert_and_dense_bytes_olmoe_by_hand():
    dense, experts = expert_and_dense_bytes(tiny_model("olmoe"))
    # one expert: gate_up (32 x 32) + down (32 x 16) + router row (32) floats
    assert experts == [(32 * 32 + 32 * 16 + 32) * 4] * 3
    attention = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 32 + 16  # q, k, v, o, q_norm, k_norm
    per_layer = attention + 2 * 32  # + input / post-attention norms
    model_wide = 128 * 32 * 2 + 32 + 4 + 4  # embeddings, lm_head, final norm, rotary inv_freq buffers
    assert dense == (3 * per_layer + model_wide) * 4


def test_expert_and_dense_bytes_deepseek_v3_by_hand():
    dense, experts = expert_and_dense_bytes(tiny_model("deepseek_v3"))
    # one expert: gate_up + down + router row + its e_score_correction_bias entry
    assert experts == [(32 * 32 + 32 * 16 + 32 + 1) * 4] * 2
    attention = 16 * 32 + 16 + 64 * 16 + 24 * 32 + 16 + 64 * 16 + 32 * 32  # MLA projections and norms
    per_layer = attention + 2 * 32
    dense_mlp = 3 * 48 * 32  # layer 0 is dense
    shared_experts = 2 * (3 * 16 * 32)  # layers 1 and 2: shared experts are dense
    model_wide = 128 * 32 * 2 + 32 + 4 + 4
    assert dense == (3 * per_layer + dense_mlp + shared_experts + model_wide) * 4


def test_chosen_memory_is_the_pruned_models_size():
    model = tiny_model("olmoe")
    dense, experts = expert_and_dense_bytes(model)
    layers = moe_layers(model)
    generator = torch.Generator().manual_seed(3)
    activation = [torch.rand(layer.num_experts, generator=generator) for layer in layers]
    budget = dense + 5 * sum(experts)
    choice = choose_sub_moe(
        activation,
        budget_bytes=budget,
        dense_bytes=dense,
        expert_bytes=experts,
        min_experts=[layer.top_k for layer in layers],
    )
    select_experts(model, choice.keep([layer.name for layer in layers]))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    assert size == choice.memory_bytes <= budget
    assert expert_and_dense_bytes(model) == (dense, experts)


# -- activation estimate ---------------------------------------------------------------------------


def test_estimate_is_the_data_weighted_mean_of_normalised_neighbours():
    estimate = estimate_activation(
        [
            (vectors([1, 0], [0.5, 0.5, 0]), 1),
            (vectors([0, 2], [0, 0, 4]), 3),  # un-normalised: [0, 1] and [0, 0, 1]
        ]
    )
    torch.testing.assert_close(estimate[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(estimate[1], torch.tensor([0.125, 0.125, 0.75], dtype=torch.float64))


def test_estimate_errors():
    with pytest.raises(FedExpertsError, match="no client of the same category"):
        estimate_activation([])
    with pytest.raises(FedExpertsError, match="disagree on the expert count"):
        estimate_activation([(vectors([1, 0]), 1), (vectors([1, 0, 0]), 1)])
    with pytest.raises(FedExpertsError, match="layers"):
        estimate_activation([(vectors([1, 0]), 1), (vectors([1, 0], [1]), 1)])
    with pytest.raises(FedExpertsError, match="no examples"):
        estimate_activation([(vectors([1, 0]), 0)])


# -- modular aggregation ---------------------------------------------------------------------------


def global_rows():
    return {
        # 3 experts; fused tensor [E, 2, 1]
        "experts.w": torch.tensor([[[0.0], [0.0]], [[10.0], [10.0]], [[7.0], [7.0]]]),
        "gate.weight": torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
        "gate.bias": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
    }


def two_updates():
    a = ExpertUpdate(
        weight=1,
        rows={
            "experts.w": torch.tensor([[[2.0], [2.0]], [[4.0], [4.0]]]),  # experts 1 and 0, in that order
            "gate.weight": torch.tensor([[4.0, 0.0], [6.0, 6.0]]),
            "gate.bias": torch.tensor([5.0, 6.0], dtype=torch.bfloat16),
        },
        held={"experts.w": [1, 0], "gate.weight": [0, 1], "gate.bias": [0, 1]},
        dense={"attn": torch.tensor([1.0])},
    )
    b = ExpertUpdate(
        weight=3,
        rows={
            "experts.w": torch.tensor([[[6.0], [6.0]]]),
            "gate.weight": torch.tensor([[10.0, 2.0]]),
            "gate.bias": torch.tensor([10.0], dtype=torch.bfloat16),
        },
        held={"experts.w": [1], "gate.weight": [1], "gate.bias": [1]},
        dense={"attn": torch.tensor([5.0])},
    )
    return a, b


def test_modular_average_hand_worked():
    averaged = modular_average(global_rows(), two_updates())
    # expert 0: held by A only -> A's rows; expert 1: A (weight 1) and B (weight 3) -> (a + 3 b) / 4;
    # expert 2: held by nobody -> unchanged
    expected_w = torch.tensor([[[4.0], [4.0]], [[(2 + 3 * 6) / 4], [(2 + 3 * 6) / 4]], [[7.0], [7.0]]])
    torch.testing.assert_close(averaged["experts.w"], expected_w)  # [[4], [4]], [[5], [5]], [[7], [7]]
    torch.testing.assert_close(averaged["gate.weight"], torch.tensor([[4.0, 0.0], [9.0, 3.0], [3.0, 3.0]]))
    # bias: expert 0 = 5, expert 1 = (6 + 3 * 10) / 4 = 9, expert 2 = 3
    assert averaged["gate.bias"].dtype == torch.bfloat16
    assert averaged["gate.bias"].tolist() == [5.0, 9.0, 3.0]


def test_modular_average_of_one_holder_and_of_no_update():
    a, _ = two_updates()
    only = ExpertUpdate(weight=7, rows={"gate.weight": a.rows["gate.weight"]}, held={"gate.weight": [2, 0]})
    averaged = modular_average(global_rows(), [only])
    torch.testing.assert_close(averaged["gate.weight"], torch.tensor([[6.0, 6.0], [2.0, 2.0], [4.0, 0.0]]))
    torch.testing.assert_close(averaged["experts.w"], global_rows()["experts.w"])
    unchanged = modular_average(global_rows(), [])
    for name, tensor in global_rows().items():
        assert torch.equal(unchanged[name], tensor)


def test_aggregate_fedmoe_combines_dense_and_expert_rows():
    state = aggregate_fedmoe({"attn": torch.tensor([0.0])}, global_rows(), two_updates())
    assert set(state) == {"attn", "experts.w", "gate.weight", "gate.bias"}
    torch.testing.assert_close(state["attn"], torch.tensor([(1.0 + 3 * 5.0) / 4]))  # 4.0, over all clients
    torch.testing.assert_close(state["gate.weight"][1], torch.tensor([9.0, 3.0]))
    same = aggregate_fedmoe({"attn": torch.tensor([0.5])}, global_rows(), [])
    assert same["attn"].item() == 0.5 and torch.equal(same["gate.weight"], global_rows()["gate.weight"])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (ExpertUpdate(1, {"gate.weight": torch.zeros(1, 2)}, {"gate.weight": [3]}), "distinct and in"),
        (ExpertUpdate(1, {"gate.weight": torch.zeros(2, 2)}, {"gate.weight": [1, 1]}), "distinct and in"),
        (ExpertUpdate(1, {"gate.weight": torch.zeros(2, 2)}, {"gate.weight": [1]}), "do not fit"),
        (ExpertUpdate(1, {"gate.weight": torch.zeros(1, 3)}, {"gate.weight": [1]}), "do not fit"),
        (ExpertUpdate(1, {"other": torch.zeros(1, 2)}, {"other": [1]}), "not an expert-row tensor"),
        (ExpertUpdate(1, {"gate.weight": torch.zeros(1, 2)}, {}), "rows and held"),
        (ExpertUpdate(0, {}, {}), "positive"),
    ],
)
def test_bad_expert_updates(update, message):
    with pytest.raises(FedExpertsError, match=message):
        modular_average(global_rows(), [update])


def test_aggregate_fedmoe_checks_dense_keys():
    a, b = two_updates()
    b = ExpertUpdate(b.weight, b.rows, b.held, dense={"mlp": torch.tensor([1.0])})
    with pytest.raises(FedExpertsError, match="dense tensors differ"):
        aggregate_fedmoe({"attn": torch.tensor([0.0])}, global_rows(), [a, b])
    with pytest.raises(FedExpertsError, match="both dense and expert-row"):
        aggregate_fedmoe({"gate.weight": torch.zeros(3, 2)}, global_rows(), [a])


# -- expert recommendation -------------------------------------------------------------------------


def test_recommend_adds_when_neighbours_hold_more():
    activations = {
        "me": vectors([0.5, 0.5, 0, 0]),
        "n1": vectors([0.4, 0.3, 0.3, 0]),  # cosine 0.849
        "n2": vectors([0.3, 0.3, 0.2, 0.2]),  # cosine 0.832
        "far": vectors([0, 0, 0, 1]),  # cosine 0
    }
    current = {"me": [[0, 1]], "n1": [[0, 1, 2]], "n2": [[0, 1, 2, 3]], "far": [[3]]}
    # one neighbour (n1, 3 experts): add the best-estimated missing expert, 2 (0.3) rather than 3 (0)
    assert recommend("me", activations, current, top_k_neighbours=1, min_experts=[2]) == [[0, 1, 2]]
    # n1 and n2: round(3.5) = 4 experts
    assert recommend("me", activations, current, top_k_neighbours=2, min_experts=[2]) == [[0, 1, 2, 3]]


def test_recommend_removes_when_neighbours_hold_fewer():
    activations = {
        "me": vectors([0.4, 0.3, 0.2, 0.1]),
        "a": vectors([0.6, 0.4, 0, 0]),  # cosine 0.912
        "b": vectors([0.1, 0.5, 0.4, 0]),  # cosine 0.761
    }
    current = {"me": [[0, 1, 2, 3]], "a": [[0, 1]], "b": [[1, 2]]}
    # estimates (unnormalised): 0: .912 * .6 + .761 * .1 = .623; 1: .745; 2: .304; 3: 0 -> drop 3, then 2
    assert recommend("me", activations, current, top_k_neighbours=2, min_experts=[1]) == [[0, 1]]
    assert recommend("me", activations, current, top_k_neighbours=2, min_experts=[3]) == [[0, 1, 2]]


def test_recommend_weights_neighbours_by_similarity():
    activations = {
        "me": vectors([1, 0, 0, 0]),
        "close": vectors([0.8, 0.2, 0, 0]),  # cosine 0.970
        "distant": vectors([0.1, 0, 0.3, 0.6]),  # cosine 0.147
    }
    current = {"me": [[0]], "close": [[0, 1]], "distant": [[2, 3]]}
    # similarity-weighted: expert 1 scores .970 * .2 = .194 > expert 2's .147 * .3 = .044;
    # a plain mean would have picked expert 2 (.15 > .10)
    assert recommend("me", activations, current, top_k_neighbours=2, min_experts=[1]) == [[0, 1]]


def test_recommend_handles_several_layers_of_different_sizes():
    activations = {
        "me": vectors([1, 0, 0], [0, 1]),
        "other": vectors([0.5, 0.5, 0], [0.5, 0.5]),
    }
    current = {"me": [[0], [1]], "other": [[0, 1], [0, 1]]}
    assert recommend("me", activations, current, top_k_neighbours=3, min_experts=[1, 1]) == [[0, 1], [0, 1]]


def test_recommend_errors():
    activations = {"me": vectors([1, 0])}
    with pytest.raises(FedExpertsError, match="no other client"):
        recommend("me", activations, {"me": [[0]]}, top_k_neighbours=1, min_experts=[1])
    with pytest.raises(FedExpertsError, match="missing structures"):
        recommend("me", {**activations, "x": vectors([0, 1])}, {"me": [[0]]}, top_k_neighbours=1, min_experts=[1])
    with pytest.raises(FedExpertsError, match="different layer structure"):
        recommend(
            "me",
            {**activations, "x": vectors([0, 1, 0])},
            {"me": [[0]], "x": [[1]]},
            top_k_neighbours=1,
            min_experts=[1],
        )
    with pytest.raises(FedExpertsError, match="at least 1"):
        recommend("me", activations, {"me": [[0]]}, top_k_neighbours=0, min_experts=[1])


# -- recommendation schedule -----------------------------------------------------------------------


OLD = [[0, 1]]
NEW = [[0, 1, 2]]


def never():
    raise AssertionError("no proposal was expected")


def test_no_proposal_before_patience_runs_out():
    state = RecommendationState(patience=3)
    assert state.observe(0.5, OLD, never).action is Action.KEEP
    assert state.observe(0.4, OLD, never).action is Action.KEEP
    assert state.observe(0.45, OLD, never).action is Action.KEEP
    assert state.observe(0.6, OLD, never).action is Action.KEEP  # improvement resets the count
    assert state.observe(0.6, OLD, never).action is Action.KEEP  # equal is not better
    assert state.observe(0.5, OLD, never).action is Action.KEEP
    decision = state.observe(0.5, OLD, lambda: NEW)
    assert decision.action is Action.ADJUST and decision.structure == NEW
    assert state.previous == OLD and state.best_before_trial == 0.6


def adjusted_state():
    state = RecommendationState(patience=1)
    state.observe(0.5, OLD, never)
    assert state.observe(0.4, OLD, lambda: NEW).action is Action.ADJUST
    return state


def test_a_trial_that_improves_is_kept():
    state = adjusted_state()
    assert state.observe(0.55, NEW, never).action is Action.KEEP
    assert state.previous is None and not state.frozen and state.best == 0.55
    # the cycle starts again on the new structure
    assert state.observe(0.5, NEW, lambda: [[0, 2]]).structure == [[0, 2]]


def test_a_trial_that_does_not_improve_reverts_and_freezes():
    state = adjusted_state()
    decision = state.observe(0.5, NEW, never)  # equal to the best before the trial
    assert decision.action is Action.REVERT and decision.structure == OLD
    assert state.frozen and state.best == 0.5
    for score in (0.1, 0.2, 0.0, 0.9):
        assert state.observe(score, OLD, never).action is Action.KEEP


def test_the_same_proposal_is_no_trial_and_lower_can_be_better():
    state = RecommendationState(patience=1, higher_is_better=False)
    state.observe(2.0, OLD, never)
    assert state.observe(1.5, OLD, never).action is Action.KEEP  # a lower loss is better
    assert state.observe(1.7, OLD, lambda: [[1, 0]]).action is Action.KEEP  # same structure, nothing to try
    assert state.previous is None
    assert state.observe(1.8, OLD, lambda: NEW).action is Action.ADJUST
    assert state.observe(1.4, NEW, never).action is Action.KEEP


def test_schedule_round_trips_through_json():
    state = adjusted_state()
    restored = RecommendationState.from_json(state.to_json())
    assert restored == state
    assert restored.observe(0.4, NEW, never).structure == OLD
    with pytest.raises(FedExpertsError, match="patience"):
        RecommendationState(patience=0)

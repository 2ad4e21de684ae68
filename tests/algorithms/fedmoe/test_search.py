"""Stage 1: the sub-MoE search (bisection, exact, brute force) and the random baseline's draw; no model."""

import random
from fractions import Fraction

import pytest
import torch

from fedexperts.algorithms.fedmoe.search import choose_sub_moe, choose_sub_moe_exact, random_sub_moe
from fedexperts.errors import FedExpertsError

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

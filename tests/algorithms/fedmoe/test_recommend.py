"""Stage 2: expert recommendation and the per-client recommendation schedule; no model."""

import pytest
import torch

from fedexperts.algorithms.fedmoe.recommend import Action, RecommendationState, copies, recommend
from fedexperts.errors import FedExpertsError


def vectors(*rows):
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


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


def test_recommend_sizes_by_the_total_and_ranks_across_layers():
    activations = {
        "me": vectors([1, 0, 0], [1, 0, 0]),
        "n": vectors([0.7, 0.2, 0.1], [0.1, 0.6, 0.3]),
    }
    current = {"me": [[0], [0]], "n": [[0, 1, 2], [0]]}
    # n holds 4 experts in all, me 2: add the 2 best-estimated ones wherever they are (both in layer 1),
    # not n's per-layer counts (which would have grown layer 0)
    assert recommend("me", activations, current, top_k_neighbours=1, min_experts=[1, 1]) == [[0], [0, 1, 2]]
    # shrinking: drop the lowest-estimated experts across layers, never below a layer's minimum
    current = {"me": [[0, 1, 2], [0, 1, 2]], "n": [[0], [0, 1]]}
    assert recommend("me", activations, current, top_k_neighbours=1, min_experts=[1, 1]) == [[0], [1, 2]]


def test_copies_are_estimates_from_each_other_or_from_the_same_clients():
    origins = {"a": ("m",), "b": ("m",), "c": ("m", "n")}
    assert copies("a", "m", origins) and copies("m", "a", origins) and copies("a", "b", origins)
    assert not copies("a", "c", origins) and not copies("m", "n", origins)


def test_abandoning_a_trial_reverts_and_freezes():
    state = RecommendationState(patience=1)
    state.observe(0.5, [[0]], lambda: [[0, 1]])
    assert state.observe(0.5, [[0]], lambda: [[0, 1]]).action is Action.ADJUST
    assert state.abandon_trial() == [[0]] and state.frozen and state.best == 0.5
    assert state.abandon_trial() is None

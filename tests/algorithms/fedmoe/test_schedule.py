"""FedMoE's server-side planning without a model: budgets, plans, stage-1 choices, recommendation, state."""

import json
import logging

import pytest
import torch

from fedexperts.algorithms.fedmoe.activation import estimate_activation, normalised_layers
from fedexperts.algorithms.fedmoe.config import FedMoEOptions
from fedexperts.algorithms.fedmoe.layout import Layout
from fedexperts.algorithms.fedmoe.records import Phase, Plan, Reply, Source, records_from_state, records_to_state
from fedexperts.algorithms.fedmoe.schedule import Schedule, client_budgets
from fedexperts.algorithms.fedmoe.search import choose_sub_moe
from fedexperts.errors import FedExpertsError

# two MoE layers of 4 experts, top-1; the dense part is 100 bytes and an expert 10:
# the full model is 100 + 8 * 10 = 180 bytes, the smallest sub-MoE 100 + 2 * 10 = 120
LAYOUT = Layout(
    layer_names=["layers.0.mlp", "layers.1.mlp"],
    num_experts=[4, 4],
    top_k=[1, 1],
    rows={"layers.0.mlp.experts.w": 0, "layers.1.mlp.experts.w": 1},
    dense=["attention.lora"],
    dense_bytes=100,
    expert_bytes=[10, 10],
)
P_BIG = [torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, 1.0])]


def schedule(budgets, **settings):
    planned = Schedule(budgets=budgets, **settings)
    planned.prepare(LAYOUT)
    return planned


def choice(activation, budget):
    chosen = choose_sub_moe(activation, budget_bytes=budget, dense_bytes=100, expert_bytes=[10, 10], min_experts=[1, 1])
    return [list(kept) for kept in chosen.kept]


def test_budgets_from_the_config_follow_the_client_order():
    options = FedMoEOptions(budgets=[5, 6, 7])
    assert client_budgets(options, ["a", "b", "c"]) == ({"a": 5, "b": 6, "c": 7}, ["a", "c"])
    assert client_budgets(options, None) == (None, [])  # fedexperts plan: budget_fraction applies
    assert client_budgets(FedMoEOptions(full_budget_every=0), ["a", "b"]) == (None, [])
    assert client_budgets(FedMoEOptions(full_budget_every=3), list("abcdefg"))[1] == ["a", "d", "g"]
    with pytest.raises(FedExpertsError, match="budgets has 3 entries for 2 clients"):
        client_budgets(options, ["a", "b"])
    planned = Schedule.from_options(FedMoEOptions(budget_fraction=0.75, patience=3), ["a", "b"], name="x")
    assert (planned.budgets, planned.full_budget_clients, planned.patience) == (None, {"a"}, 3)
    planned.prepare(LAYOUT)
    assert planned.budget("a") == 180 and planned.budget("b") == 135  # floor(0.75 * 180)
    with pytest.raises(FedExpertsError, match="memory budgets must be positive"):
        Schedule(budgets={"a": 0})


def test_budgets_are_checked_against_the_layout(caplog):
    with pytest.raises(FedExpertsError, match=r"memory budget of b \(algorithm.fedmoe.budgets\[1\] = 119 bytes\)"):
        schedule({"a": 180, "b": 119})
    with pytest.raises(FedExpertsError, match=r"budget_fraction = 0.5 gives every client 90 bytes, too small"):
        schedule(None, budget_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        schedule({"a": 179})
    assert "no client's budget holds the full model (180 bytes)" in caplog.text
    planned = schedule({"a": 180})
    assert (planned.full_bytes, planned.min_bytes) == (180, 120)
    with pytest.raises(FedExpertsError, match="no memory budget for z"):
        planned.budget("z")


def test_a_first_round_is_planned_from_the_budgets_and_the_uniform_prior():
    planned = schedule({"big": 180, "mid": 150, "small": 120})
    assert planned.plan("big") == Plan(Phase.PROFILE, measure=True)
    mid, small = planned.plan("mid"), planned.plan("small")
    assert (mid.phase, mid.source, mid.structure) == (Phase.TRAIN, Source.PRIOR, [[0, 1], [0, 1]])  # 140 <= 150
    assert (small.source, small.structure) == (Source.PRIOR, [[0], [0]])
    assert [v.tolist() for v in mid.activation] == [[0.25] * 4] * 2
    assert planned.clients == {}  # planning writes nothing


def test_replies_turn_into_measured_category_and_federation_estimates():
    planned = schedule({"big": 180, "mid": 150, "small": 130})
    plans = {client: planned.plan(client) for client in ("big", "mid", "small")}
    replies = [
        Reply("big", 6, "x", activation=P_BIG),
        Reply("mid", 2, "x"),
        Reply("small", 3, "y", score=0.5),
    ]
    planned.observe(replies, plans)
    big, mid, small = (planned.clients[c] for c in ("big", "mid", "small"))
    assert (big.source, big.profiles, big.examples, big.structure) == (Source.MEASURED, 1, 6, [[0, 1, 2, 3]] * 2)
    for vector, expected in zip(big.activation, normalised_layers(P_BIG), strict=True):
        assert torch.equal(vector, expected)
    # mid shares big's category: its provisional prior sub-MoE is re-chosen from big's p
    estimate = estimate_activation([(big.activation, 6)])
    assert (mid.source, mid.structure, mid.category) == (Source.CATEGORY, choice(estimate, 150), "x")
    assert mid.structure == [[0, 1, 2], [0, 3]]
    # small's category has no measured client: the federation's mean, still provisional
    assert (small.source, small.structure) == (Source.FEDERATION, choice(estimate, 130))
    assert planned.plan("small") == Plan(Phase.TRAIN, small.structure, Source.FEDERATION, small.activation)
    # a later round with a category reported re-chooses again (federation -> category)
    planned.observe([Reply("small", 3, None)], {"small": planned.plan("small")})
    assert small.category == "y" and small.source is Source.FEDERATION  # no category reported: kept
    planned.observe([Reply("big", 6, "y")], {"big": planned.plan("big")})
    assert small.source is Source.CATEGORY and big.category == "y"


def test_warmup_rounds_profile_without_measuring_first():
    planned = schedule({"a": 180}, warmup_rounds=2)
    for done in range(2):
        plan = planned.plan("a")
        assert plan == Plan(Phase.PROFILE, measure=False)
        planned.observe([Reply("a", 1)], {"a": plan})
        assert planned.clients["a"].profiles == done + 1 and planned.clients["a"].structure is None
    assert planned.plan("a").measure is True
    planned.observe([Reply("a", 1, activation=P_BIG)], {"a": planned.plan("a")})
    assert planned.structure_of("a") == [[0, 1, 2, 3]] * 2 and planned.source_of("a") is Source.MEASURED


def near(*hot):
    vector = torch.full((4,), 0.01, dtype=torch.float64)
    vector[list(hot)] = 1.0
    return [vector]


ONE_LAYER = Layout(["moe"], [4], [1], {"moe.w": 0}, [], dense_bytes=0, expert_bytes=[1])


def recommending(budget_a, **settings):
    planned = Schedule(budgets={"a": budget_a, "b": 4, "c": 4}, patience=1, top_k_neighbours=1, **settings)
    planned.prepare(ONE_LAYER)
    planned.assign("a", [[0]], activation=[torch.tensor([1.0, 0.5, 0.02, 0.01])])
    planned.assign("b", [[0, 1, 2]], activation=[torch.tensor([1.0, 0.8, 0.5, 0.01])])  # a's nearest
    planned.assign("c", [[3]], activation=near(3))
    return planned


def scored(planned, client, score):
    planned.observe([Reply(client, 4, score=score)], {client: planned.plan(client)})
    return planned.structure_of(client)


def test_a_stale_client_tries_its_neighbours_structure_and_reverts_for_good():
    planned = recommending(3)
    assert scored(planned, "a", 0.5) == [[0]]
    assert scored(planned, "a", None) == [[0]]  # no score: not counted
    assert scored(planned, "a", 0.5) == [[0, 1, 2]]  # patience 1 ran out: b's count, b's best experts
    record = planned.clients["a"]
    assert record.recommended and record.recommendation.previous == [[0]]
    assert scored(planned, "a", 0.4) == [[0]]  # the trial did worse: back, and frozen
    assert record.recommendation.frozen
    for score in (0.1, 0.9, 0.1):
        assert scored(planned, "a", score) == [[0]]


def test_a_recommendation_is_shrunk_to_the_budget_dropping_what_the_client_ranks_lowest():
    planned = recommending(2)
    scored(planned, "a", 0.5)
    assert scored(planned, "a", 0.5) == [[0, 1]]  # 2 (a's p: 0.02) dropped before 1 (0.5)
    assert planned.memory(planned.structure_of("a")) <= 2


def test_random_schedules_never_recommend_and_draw_the_searched_sizes():
    planned = recommending(3, seed=(0, 1))
    assert not planned.recommends
    for _ in range(4):
        assert scored(planned, "a", 0.5) == [[0]]
    drawn, searched = schedule({"big": 180, "mid": 150}, seed=(0, 7)), schedule({"big": 180, "mid": 150})
    assert [len(layer) for layer in drawn.structure_of("mid")] == [len(layer) for layer in searched.structure_of("mid")]
    assert drawn.structure_of("mid") == schedule({"big": 180, "mid": 150}, seed=(0, 7)).structure_of("mid")


def test_assign_checks_the_layout_and_the_budget():
    planned = schedule({"a": 140})
    with pytest.raises(FedExpertsError, match=r"a: layers.1.mlp experts \[4\] must be distinct, in \[0, 4\)"):
        planned.assign("a", [[0], [4]])
    with pytest.raises(FedExpertsError, match="structure covers 1 layers, the model has 2"):
        planned.assign("a", [[0]])
    with pytest.raises(FedExpertsError, match="needs 150 bytes, over its budget of 140"):
        planned.assign("a", [[0, 1, 2], [0, 1]])
    with pytest.raises(FedExpertsError, match="does not match the expert counts"):
        planned.assign("a", [[1], [0]], activation=[torch.ones(4)])
    planned.assign("a", [[1], [2, 0]], category="x", examples=3)
    assert planned.structure_of("a") == [[1], [0, 2]] and planned.source_of("a") is Source.ASSIGNED


def test_the_server_state_round_trips_through_tensors_and_json():
    planned = schedule({"big": 180, "mid": 150, "small": 130})
    plans = {client: planned.plan(client) for client in ("big", "mid", "small")}
    planned.observe([Reply("big", 6, "x", P_BIG), Reply("mid", 2, "x"), Reply("small", 3, "y", score=0.5)], plans)
    tensors, clients = planned.state()
    assert sorted(tensors) == [f"activation/{c}/{layer}" for c in ("big", "mid", "small") for layer in (0, 1)]
    assert clients["big"]["source"] == "measured" and clients["mid"]["structure"] == [[0, 1, 2], [0, 3]]
    restored = schedule({"big": 180, "mid": 150, "small": 130})
    restored.load_state(
        {key: value.to(torch.float32) for key, value in tensors.items()}, json.loads(json.dumps(clients))
    )
    again, clients_again = restored.state()
    assert clients_again == clients
    assert all(value.dtype == torch.float64 for value in again.values())  # p is kept in float64
    for client in ("big", "mid", "small"):
        assert restored.plan(client).structure == planned.plan(client).structure
    assert records_from_state({}, {}, 2) == {}
    assert records_to_state({}) == ({}, {})


# -- the paper's schedule ----------------------------------------------------------------------------


def test_budget_clients_wait_for_stage_1_then_start_from_their_categorys_estimate():
    planned = schedule({"big": 180, "mid": 150}, warmup_rounds=1, wait_for_stage_1=True)
    assert planned.profilers == ["big"] and not planned.stage_1_done
    for measure in (False, True):  # the warm-up round, then the measuring round
        plans = {"big": planned.plan("big"), "mid": planned.plan("mid")}
        assert plans == {"big": Plan(Phase.PROFILE, measure=measure), "mid": Plan(Phase.WAIT)}
        big = Reply("big", 6, "x", activation=P_BIG if measure else None)
        planned.observe([big, Reply("mid", 2, "x")], plans)
        assert planned.clients["mid"].structure is None  # a waiting client trains nothing and is given nothing
    assert planned.stage_1_done
    first = planned.plan("mid")
    estimate = estimate_activation([(planned.clients["big"].activation, 6)])
    assert (first.phase, first.source, first.origin) == (Phase.TRAIN, Source.CATEGORY, ("big",))
    assert first.structure == choice(estimate, 150)
    planned.observe([Reply("mid", 2, "x", score=0.5)], {"mid": first})
    assert planned.clients["mid"].origin == ("big",)
    assert planned.state()[1]["mid"]["origin"] == ["big"]


def test_without_profilers_stage_1_is_done_at_once_and_the_prior_is_used():
    planned = schedule({"a": 150, "b": 130}, wait_for_stage_1=True)
    assert planned.stage_1_done and planned.plan("a").source is Source.PRIOR


def test_a_trial_no_evaluation_judged_is_reverted_before_the_final_evaluation():
    planned = recommending(3)
    scored(planned, "a", 0.5)
    assert scored(planned, "a", 0.5) == [[0, 1, 2]]  # a trial set in the last round
    planned.finish()
    record = planned.clients["a"]
    assert planned.structure_of("a") == [[0]] and record.recommendation.frozen
    assert record.recommendation.previous is None and record.recommendation.best == 0.5
    planned.finish()  # idempotent (a resumed run calls it again)
    assert planned.structure_of("a") == [[0]]


def test_a_waiting_client_gets_a_sub_moe_for_the_final_evaluation():
    planned = schedule({"big": 180, "mid": 150}, warmup_rounds=3, wait_for_stage_1=True)
    assert planned.plan("mid").phase is Phase.WAIT
    planned.finish()  # the run ended inside stage 1
    assert planned.plan("mid").phase is Phase.TRAIN


def test_clients_whose_p_copies_anothers_are_not_its_neighbours():
    planned = Schedule(budgets={"m": 4, "copy": 3, "other": 4}, patience=1, top_k_neighbours=1)
    planned.prepare(ONE_LAYER)
    p_m = [torch.tensor([1.0, 0.5, 0.02, 0.01])]
    planned.assign("m", [[0, 1, 2, 3]], activation=p_m)
    planned.assign("copy", [[0]], activation=p_m)  # cosine 1 with m: m would be its only neighbour
    planned.assign("other", [[0, 1]], activation=[torch.tensor([1.0, 0.2, 0.1, 0.0])])
    planned.clients["copy"].origin = ("m",)
    scored(planned, "copy", 0.5)
    # stale: the neighbour is "other" (2 experts: add one), not "m" (4 experts: would add three)
    assert scored(planned, "copy", 0.5) == [[0, 1]]

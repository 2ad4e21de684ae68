"""Modular aggregation: each expert row averaged among its holders, dense tensors over everyone; no model."""

import pytest
import torch

from fedexperts.algorithms.fedmoe.aggregate import ExpertUpdate, aggregate_fedmoe, keep_unheld_rows, modular_average
from fedexperts.errors import FedExpertsError

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


def test_rows_no_update_held_are_put_back():
    before = global_rows()
    stepped = {name: tensor + 1 for name, tensor in before.items()}  # a server rule that moved every row
    a, b = two_updates()
    only_b = ExpertUpdate(b.weight, {"gate.weight": b.rows["gate.weight"]}, {"gate.weight": [1]})
    kept = keep_unheld_rows(before, dict(stepped), [a, only_b], ["experts.w", "gate.weight"])
    assert torch.equal(kept["experts.w"][:2], stepped["experts.w"][:2])  # experts 0 and 1: held by a
    assert torch.equal(kept["experts.w"][2], before["experts.w"][2])  # expert 2: nobody
    assert torch.equal(kept["gate.weight"][2], before["gate.weight"][2])
    assert torch.equal(kept["gate.bias"], stepped["gate.bias"])  # not named: left as stepped


def test_row_weights_weigh_each_holder_by_the_tokens_it_routed_to_that_expert():
    a, b = two_updates()
    rows = {"experts.w": global_rows()["experts.w"]}
    # a holds experts [1, 0] and routed 0 and 4 tokens to them; b holds expert 1 and routed 2 tokens to it.
    a = ExpertUpdate(
        a.weight, {"experts.w": a.rows["experts.w"]}, {"experts.w": [1, 0]}, row_weights={"experts.w": [0, 4]}
    )
    b = ExpertUpdate(b.weight, {"experts.w": b.rows["experts.w"]}, {"experts.w": [1]}, row_weights={"experts.w": [2]})
    averaged = modular_average(rows, [a, b])
    # expert 0: a's 4.0; expert 1: b's 6.0 alone (by examples (2 + 3 * 6) / 4 = 5); expert 2: held by nobody, 7
    torch.testing.assert_close(averaged["experts.w"], torch.tensor([[[4.0], [4.0]], [[6.0], [6.0]], [[7.0], [7.0]]]))
    nobody = ExpertUpdate(1, {"experts.w": torch.zeros(1, 2, 1)}, {"experts.w": [1]}, row_weights={"experts.w": [0]})
    assert torch.equal(modular_average(rows, [nobody])["experts.w"], rows["experts.w"])
    kept = keep_unheld_rows(rows, {"experts.w": rows["experts.w"] + 1}, [nobody], ["experts.w"])
    assert torch.equal(kept["experts.w"], rows["experts.w"])  # held, but routed to by nobody: put back


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"experts.w": [1, 2]}, "one finite non-negative weight per held row"),
        ({"experts.w": [-1]}, "non-negative"),
        ({"other": [1]}, "name exactly"),
    ],
)
def test_bad_row_weights(weights, message):
    update = ExpertUpdate(1, {"experts.w": torch.zeros(1, 2, 1)}, {"experts.w": [1]}, row_weights=weights)
    with pytest.raises(FedExpertsError, match=message):
        modular_average(global_rows(), [update])

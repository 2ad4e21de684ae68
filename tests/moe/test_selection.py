import pytest
import torch

from fedexperts.errors import FedExpertsError
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import GraftChoice, moe_layers, reconstruction_losses


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_one_pass_picks_what_the_per_expert_loop_picks(model_type, batch_factory):
    model = tiny_model(model_type)
    batches = [batch_factory(model, seed=1), batch_factory(model, seed=2)]
    fast = reconstruction_losses(model, batches, tokens_per_chunk=7)
    slow = reconstruction_losses(model, batches, method="per-expert")
    assert fast.keys() == {layer.name for layer in moe_layers(model)}
    for name in fast:
        torch.testing.assert_close(fast[name].losses, slow[name].losses, rtol=1e-4, atol=1e-6)
        assert fast[name].best == slow[name].best
        assert fast[name].ranking == slow[name].ranking
        assert len(set(fast[name].losses.tolist())) > 1, "every expert scored the same"


def test_losses_are_frobenius_norms_over_real_tokens_only(batch_factory):
    model = tiny_model("qwen2_moe")
    batch = batch_factory(model)
    padded = reconstruction_losses(model, [batch])
    rows = []
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        rows.append({key: value[row : row + 1, :length] for key, value in batch.items()})
    alone = reconstruction_losses(model, rows)
    for name in padded:
        torch.testing.assert_close(padded[name].losses, alone[name].losses, rtol=1e-4, atol=1e-6)


def test_model_training_mode_is_restored(batch_factory):
    model = tiny_model("olmoe").train()
    reconstruction_losses(model, [batch_factory(model)])
    assert model.training


def test_top_n_and_its_bounds():
    choice = GraftChoice("layer", torch.tensor([0.5, 0.1, 0.9, 0.3]))
    assert choice.best == 1
    assert choice.top(3) == [1, 3, 0]
    with pytest.raises(FedExpertsError, match="cannot graft top-5 of 4"):
        choice.top(5)
    with pytest.raises(FedExpertsError, match="top-0"):
        choice.top(0)


def test_no_calibration_batch_is_an_error():
    with pytest.raises(FedExpertsError, match="at least one calibration batch"):
        reconstruction_losses(tiny_model("olmoe"), [])


def test_unknown_method_is_an_error(batch_factory):
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="'fastest' is not a valid SelectionMethod"):
        reconstruction_losses(model, [batch_factory(model)], method="fastest")

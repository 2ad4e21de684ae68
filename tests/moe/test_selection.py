import pytest
import torch

from fedexperts.errors import FedExpertsError
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import GraftChoice, SelectionCriterion, moe_layers, reconstruction_losses
from fedexperts.moe.experts import one_expert_output


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


def _rows(model, rows, length, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _layer_errors(model, batches):
    """Per layer, per batch, per expert: ||Z_b - E_j(X_b)||_F in float64, from hooks written here."""
    layers = moe_layers(model)
    seen = {layer.name: [] for layer in layers}

    def hook_for(layer):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            z = layer.family.block_output(output).reshape(x.shape).double()
            norms = [torch.linalg.norm(z - one_expert_output(layer, j, x).double()) for j in range(layer.num_experts)]
            seen[layer.name].append(torch.stack(norms))

        return hook

    handles = [layer.block.register_forward_hook(hook_for(layer)) for layer in layers]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: torch.stack(per_batch) for name, per_batch in seen.items()}


def test_pooled_and_per_batch_losses_match_hand_computed_norms():
    model = tiny_model("olmoe").eval()
    batches = [_rows(model, 8, 16, 2), _rows(model, 1, 3, 102)]  # batches of 128 and 3 tokens
    norms = _layer_errors(model, batches)  # (batches, experts) per layer
    pooled = reconstruction_losses(model, batches, criterion="pooled")
    per_batch = reconstruction_losses(model, batches, criterion=SelectionCriterion.PER_BATCH)
    for name, each in norms.items():
        torch.testing.assert_close(pooled[name].losses, each.pow(2).sum(dim=0).sqrt(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(per_batch[name].losses, each.sum(dim=0), rtol=1e-5, atol=1e-7)
        assert per_batch[name].losses.dtype is torch.float64
    # with batches this unequal the two criteria disagree on some layer's best expert
    assert any(pooled[name].best != per_batch[name].best for name in norms)


def test_one_batch_scores_the_same_under_both_criteria(batch_factory):
    model = tiny_model("qwen2_moe")
    batch = batch_factory(model)
    pooled = reconstruction_losses(model, [batch])
    per_batch = reconstruction_losses(model, [batch], criterion="per-batch", method="per-expert")
    for name in pooled:
        torch.testing.assert_close(pooled[name].losses, per_batch[name].losses, rtol=1e-4, atol=1e-6)

import pytest
import torch

from fedexperts.errors import FedExpertsError
from fedexperts.models import TINY_FAMILIES, tiny_model
from fedexperts.moe import RoutingRecorder, moe_layers

from .helpers import recorded_and_top_k_counts

# Families whose choice is the top-k of (biased) logits: softmax is monotonic, so top-k of the raw
# logits recomputed from the router's input is an independent reference.
# Sigmoid routers with a zero correction bias (the tiny configs') choose the top-k of logits too.
TOPK_OF_LOGITS = [
    *("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "gpt_oss", "granitemoe"),
    *("qwen3_next", "qwen3_5_moe_text", "granitemoeshared", "granitemoehybrid", "jamba", "flex_olmo"),
    *("llama4_text", "minimax_m2", "minimax", "ernie4_5_moe", "hunyuan_v1_moe"),
]


def record(model, batch, **kwargs):
    recorder = RoutingRecorder(model, **kwargs)
    with recorder, recorder.mask(batch["attention_mask"], batch.get("decoder_attention_mask")), torch.no_grad():
        model(**batch)
    return recorder


@pytest.mark.parametrize("model_type", TOPK_OF_LOGITS)
def test_counts_match_an_independent_top_k_recomputation(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    recorder, expected = recorded_and_top_k_counts(model, batch)
    real = int(batch["attention_mask"].sum())
    for layer in moe_layers(model):
        assert torch.equal(recorder.counts()[layer.name], expected[layer.name]), layer.name
        assert recorder.stats[layer.name].tokens == real


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_padding_is_not_counted(model_type, batch_factory):
    """Counts on a right-padded batch equal the counts of each row run alone without its padding."""
    model = tiny_model(model_type)
    batch = batch_factory(model)
    padded = record(model, batch).counts()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    alone = {name: torch.zeros_like(counts) for name, counts in padded.items()}
    for row, length in enumerate(lengths):
        single = {key: value[row : row + 1, :length] for key, value in batch.items()}
        for name, counts in record(model, single).counts().items():
            alone[name] += counts
    for name in padded:
        assert torch.equal(padded[name], alone[name]), name


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_real_token_is_routed_to_top_k_experts(model_type, batch_factory):
    model = tiny_model(model_type)
    batch = batch_factory(model)
    recorder = record(model, batch, keep_tokens=True)
    tokens = int(batch["attention_mask"].sum())
    for layer in moe_layers(model):
        stats = recorder.stats[layer.name]
        decision = recorder.decisions(layer.name)
        assert decision.indices.shape == (tokens, layer.top_k)
        assert stats.tokens == tokens
        assert int(stats.counts.sum()) == int((decision.indices >= 0).sum())
        torch.testing.assert_close(stats.activation, stats.counts.double() / tokens)
        assert (decision.weights[decision.indices >= 0] > 0).all()
        if model_type != "switch_transformers":  # Switch may drop tokens past capacity
            assert int(stats.counts.sum()) == tokens * layer.top_k
            assert all(len(set(row)) == layer.top_k for row in decision.indices.tolist())


def test_mean_weight_sums_to_one_for_renormalised_routers(batch_factory):
    model = tiny_model("mixtral")
    recorder = record(model, batch_factory(model))
    for stats in recorder.stats.values():
        assert stats.mean_weight.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_counts_accumulate_over_batches(batch_factory):
    model = tiny_model("olmoe")
    first, second = batch_factory(model, seed=1), batch_factory(model, seed=2)
    together = RoutingRecorder(model)
    with together:
        for batch in (first, second):
            with together.mask(batch["attention_mask"]), torch.no_grad():
                model(**batch)
    separate = [record(model, batch).counts() for batch in (first, second)]
    for name, counts in together.counts().items():
        assert torch.equal(counts, separate[0][name] + separate[1][name])


def test_hooks_are_removed_on_exit(batch_factory):
    model = tiny_model("olmoe")
    batch = batch_factory(model)
    recorder = record(model, batch)
    before = recorder.counts()
    with torch.no_grad():
        model(**batch)
    assert all(torch.equal(before[name], counts) for name, counts in recorder.counts().items())


def test_mask_of_the_wrong_batch_is_a_clear_error(batch_factory):
    model = tiny_model("olmoe")
    batch = batch_factory(model)
    recorder = RoutingRecorder(model)
    expected = "attention mask covers 12 tokens but the router saw 30"
    with (
        recorder,
        recorder.mask(batch["attention_mask"][:, :4]),
        torch.no_grad(),
        pytest.raises(FedExpertsError, match=expected),
    ):
        model(**batch)


def test_decisions_need_keep_tokens(batch_factory):
    model = tiny_model("olmoe")
    recorder = record(model, batch_factory(model))
    with pytest.raises(FedExpertsError, match="keep_tokens=True"):
        recorder.decisions(moe_layers(model)[0].name)

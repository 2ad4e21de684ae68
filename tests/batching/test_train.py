import pytest
import torch

from fedexperts.algorithms import FedAvg
from fedexperts.batching import BatchMember, ClientRandom, client_copies, train_batched
from fedexperts.config import TrainConfig
from fedexperts.data import IGNORE_INDEX
from fedexperts.models import tiny_model
from fedexperts.training import DivergenceError, train_local, trainable_by_name

SETTINGS = TrainConfig(steps_per_round=3, learning_rate=1e-2)


def assert_trained_alike(got, want):
    """Float32 rounding differs between the batched and the lone matmuls, and AdamW divides a near-zero gradient by
    its own root mean square, so a few such coordinates' steps differ by a fraction of ``lr``: at most a tenth of a
    step anywhere, and a ten-thousandth of a step on average."""
    lr = SETTINGS.learning_rate
    for name, tensor in got.items():
        difference = (tensor.detach() - want[name]).abs()
        assert difference.max() <= lr / 10, name
        assert difference.mean() <= lr / 1e4, name


def batches(vocab, seed, rows=2, width=7):
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, vocab, (rows, width), generator=generator)
        labels = ids.clone()
        labels[:, :3] = IGNORE_INDEX
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def prepared():
    model = tiny_model("olmoe")
    FedAvg().prepare(model)
    return model


def start_values(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=generator) * 0.02 for name, p in trainable_by_name(model).items()}


def alone(model, values, seed, proximal=None):
    with torch.no_grad():
        for name, param in trainable_by_name(model).items():
            param.copy_(values[name])
    train_local(model, batches(model.config.vocab_size, seed, width=5 + seed), SETTINGS, proximal=proximal)
    return {name: param.detach().clone() for name, param in trainable_by_name(model).items()}


def member(model, values, seed, proximal=None):
    with torch.no_grad():
        for name, param in trainable_by_name(model).items():
            param.copy_(values[name])
    copies = client_copies(trainable_by_name(model))
    stream = batches(model.config.vocab_size, seed, width=5 + seed)
    return BatchMember(f"c{seed}", copies, stream, ClientRandom.capture(torch.device("cpu")), proximal)


def test_clients_trained_together_end_where_each_ends_alone():
    model = prepared()
    starts = [start_values(model, seed) for seed in range(3)]
    expected = [alone(model, starts[seed], seed) for seed in range(3)]
    members = [member(model, starts[seed], seed) for seed in range(3)]
    results = train_batched(model, members, SETTINGS, pad_token_id=0)
    assert all(result.steps == 3 for result in results)
    for chosen, want in zip(members, expected, strict=True):
        assert_trained_alike(chosen.tensors, want)


def test_a_client_that_diverges_leaves_the_batch_and_the_others_are_untouched():
    model = prepared()
    starts = [start_values(model, seed) for seed in range(2)]
    expected = alone(model, starts[0], 0)
    poisoned = member(model, starts[1], 1, proximal=lambda tensors: torch.tensor(float("nan")))
    members = [member(model, starts[0], 0), poisoned]
    results = train_batched(model, members, SETTINGS, pad_token_id=0)
    assert isinstance(results[1], DivergenceError) and "c1 diverged" in str(results[1])
    assert not isinstance(results[0], DivergenceError)
    assert_trained_alike(members[0].tensors, expected)


def test_the_proximal_term_reads_each_clients_own_tensors():
    model = prepared()
    starts = [start_values(model, seed) for seed in range(2)]

    def pull(anchor):
        return lambda tensors: sum(((tensors[n] - anchor[n]) ** 2).sum() for n in anchor)

    anchors = [start_values(model, 10 + seed) for seed in range(2)]
    expected = [alone(model, starts[seed], seed, proximal=pull(anchors[seed])) for seed in range(2)]
    members = [member(model, starts[seed], seed, proximal=pull(anchors[seed])) for seed in range(2)]
    train_batched(model, members, SETTINGS, pad_token_id=0)
    for chosen, want in zip(members, expected, strict=True):
        assert_trained_alike(chosen.tensors, want)


@pytest.mark.parametrize("field", ["attention_dropout"])
def test_a_base_that_draws_randomness_inside_frozen_operations_is_refused(field):
    from fedexperts.batching import batching_refusal

    model = prepared()
    assert batching_refusal(FedAvg(), model, SETTINGS) is None
    setattr(model.config, field, 0.1)
    assert field in (batching_refusal(FedAvg(), model, SETTINGS) or "")
    assert "checkpointing" in batching_refusal(FedAvg(), prepared(), TrainConfig(gradient_checkpointing=True))


def test_an_encoder_decoder_is_refused():
    from fedexperts.batching import batching_refusal

    model = tiny_model("switch_transformers")
    FedAvg().prepare(model)
    assert "encoder-decoder" in (batching_refusal(FedAvg(), model, SETTINGS) or "")

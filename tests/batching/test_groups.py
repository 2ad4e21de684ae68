import pytest
import torch
from torch import nn

from fedexperts.batching import BatchingError, ClientRandom, RowGroups, concatenate, grouped_forwards, stack_clients
from fedexperts.data.tokenize import IGNORE_INDEX


def batch(rows, width, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (rows, width), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_concatenation_right_pads_every_group_to_the_widest_and_remembers_each_width():
    joined, groups = concatenate([batch(2, 3, 0), batch(1, 5, 1)], pad_token_id=0)
    assert joined["input_ids"].shape == (3, 5) and groups == RowGroups((2, 1), 5, (3, 5))
    assert (joined["attention_mask"][:2, 3:] == 0).all() and (joined["labels"][:2, 3:] == IGNORE_INDEX).all()
    assert (joined["input_ids"][:2, 3:] == 0).all()
    assert groups.sizes(3) == (2, 1) and groups.sizes(15) == (10, 5) and groups.sizes(7) is None
    assert groups.slices() == [slice(0, 2), slice(2, 3)]


class Block(nn.Module):
    """A linear (trainable) over a frozen norm, with a non-Linear unit (the norm's scale trains too)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, hidden):
        return self.drop(self.proj(self.norm(hidden)))


def client_tensors(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(param.shape, generator=generator).requires_grad_(True)
        for name, param in model.named_parameters()
    }


@pytest.mark.parametrize("rows", [(2, 2, 2), (1, 3)], ids=["equal groups (stacked matmul)", "unequal groups"])
def test_each_group_of_rows_goes_through_its_own_clients_tensors_and_gradients_stay_apart(rows):
    model = Block().eval()
    tensors = [client_tensors(model, seed) for seed in range(len(rows))]
    hidden = torch.randn(sum(rows), 5, 4)
    groups = RowGroups(rows, 5, (5,) * len(rows))
    with grouped_forwards(model, stack_clients(tensors), groups):
        together = model(hidden)
    together.square().sum().backward()
    start = 0
    for chosen, count in zip(tensors, rows, strict=True):
        alone = torch.func.functional_call(
            model, {k: v.detach().requires_grad_(True) for k, v in chosen.items()}, hidden[start : start + count]
        )
        torch.testing.assert_close(together[start : start + count], alone)
        start += count
    for index, chosen in enumerate(tensors):  # a group's gradient is its own rows' alone
        part = slice(sum(rows[:index]), sum(rows[: index + 1]))
        copies = {k: v.detach().clone().requires_grad_(True) for k, v in chosen.items()}
        torch.func.functional_call(model, copies, hidden[part]).square().sum().backward()
        for name in chosen:
            torch.testing.assert_close(chosen[name].grad, copies[name].grad)
    assert "forward" not in vars(model.proj)  # the model is itself again after the block


def test_dropout_draws_each_clients_own_mask_over_its_own_width():
    model = Block().train()
    params = {name: param.detach().clone() for name, param in model.named_parameters()}
    streams = []
    alone = []
    for seed, width in ((0, 3), (1, 5)):
        torch.manual_seed(seed)
        streams.append(ClientRandom.capture(torch.device("cpu")))
        alone.append(torch.func.functional_call(model, params, torch.ones(2, width, 4)))
    hidden = torch.ones(4, 5, 4)
    groups = RowGroups((2, 2), 5, (3, 5))
    with grouped_forwards(model, stack_clients([params, params]), groups, streams):
        together = model(hidden)
    torch.testing.assert_close(together[:2, :3], alone[0])
    torch.testing.assert_close(together[2:], alone[1])


def test_a_unit_run_on_rows_that_are_not_the_batchs_is_refused():
    model = Block().eval()
    tensors = [client_tensors(model, 0), client_tensors(model, 1)]
    with (
        grouped_forwards(model, stack_clients(tensors), RowGroups((2, 2), 5, (5, 5))),
        pytest.raises(BatchingError, match="told apart"),
    ):
        model(torch.randn(3, 4))


def test_a_tied_weight_reads_the_clients_tensor_in_both_of_its_modules():
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    tensors = [{"0.weight": torch.randn(10, 4)}, {"0.weight": torch.randn(10, 4)}]
    ids = torch.tensor([[1, 2], [3, 4]])
    with grouped_forwards(model, stack_clients(tensors), RowGroups((1, 1), 2, (2, 2))):
        together = model(ids)
    for index, chosen in enumerate(tensors):
        torch.testing.assert_close(together[index], chosen["0.weight"][ids[index]] @ chosen["0.weight"].T)


def olmoe_experts():
    from fedexperts.models import tiny_model

    return tiny_model("olmoe").model.layers[0].mlp.experts.eval()


@pytest.mark.parametrize("dense", [False, True], ids=["routed (k x E experts)", "every token to every expert"])
def test_an_experts_module_runs_every_clients_experts_in_one_call_and_matches_each_alone(dense):
    experts = olmoe_experts()
    count, rows, width = 3, 2, 4
    tensors = [client_tensors(experts, seed) for seed in range(count)]
    tokens = count * rows * width
    hidden = torch.randn(tokens, experts.hidden_dim)
    if dense:
        index = torch.arange(experts.num_experts).expand(tokens, experts.num_experts)
    else:
        index = torch.randint(experts.num_experts, (tokens, 2), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(index.shape)
    with grouped_forwards(experts, stack_clients(tensors), RowGroups((rows,) * count, width, (width,) * count)):
        together = experts(hidden, index, weights)
    assert experts.num_experts == 8  # set back after the joined call
    together.square().sum().backward()
    part = rows * width
    for group, chosen in enumerate(tensors):
        copies = {key: value.detach().clone().requires_grad_(True) for key, value in chosen.items()}
        own = slice(group * part, (group + 1) * part)
        alone = torch.func.functional_call(experts, copies, (hidden[own], index[own], weights[own]))
        torch.testing.assert_close(together[own], alone)
        alone.square().sum().backward()
        for name in chosen:  # float32 sums over tokens in another order: gradients of ~10 agree to ~1e-3
            torch.testing.assert_close(chosen[name].grad, copies[name].grad, rtol=1e-3, atol=1e-3)

"""Row groups: one forward over several clients' batches, each group of rows through its own client's tensors.

The frozen base is shared by every client, so k clients' batches can go through it as one
concatenated batch; only the modules that own a client's trainable tensors (attention LoRA's
factors, FLEx's personal experts and gate, ...) must see each client's rows apart. While
:func:`grouped_forwards` is active, each such module (a *unit*: one that owns a varying parameter
directly) splits its tensor inputs along the first dimension by group, runs its own forward once per
group with that client's tensors in place of its parameters (so any module works, whatever its
forward does) and concatenates the results. An ``nn.Linear`` unit over groups of equal size is one
batched matmul over the stacked weights instead (multi-LoRA serving's segmented matmul, in its
simplest form), and a transformers experts module whose every tensor is the client's (FLEx's
personal experts) is one call over all clients' experts side by side, each group routed to its own
client's (the grouped matmul MoE kernels already do, with k x E experts). Dropout modules draw each
group's mask from that client's own random stream, so a batched client draws exactly the masks it
would draw alone.

A unit's inputs are split only where their first dimension is the batch's rows or its tokens
(rows x padded width, the flattened ``(T, H)`` an MoE block sees); any other first dimension (a
module run on a data-dependent subset of tokens, such as one expert's routed tokens) cannot be told
apart by group and is refused (:class:`BatchingError`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedexperts.data.layout import IGNORE_INDEX
from fedexperts.errors import FedExpertsError
from fedexperts.moe.experts import apply_gate, dense_projection


class BatchingError(FedExpertsError):
    """Clients cannot run as row groups of one batch (the caller runs them one after another instead)."""


@dataclass(frozen=True)
class RowGroups:
    """How a concatenated batch splits into clients: rows per group, all padded to one ``width``."""

    rows: tuple[int, ...]
    width: int
    own_widths: tuple[int, ...]
    """Each group's width in its own batch (what it would be padded to alone)."""

    @property
    def total(self) -> int:
        return sum(self.rows)

    def sizes(self, leading: int) -> tuple[int, ...] | None:
        """Each group's share of a first dimension of ``leading``: rows, tokens, or ``None`` (not split by group)."""
        if leading == self.total:
            return self.rows
        if leading == self.total * self.width:
            return tuple(rows * self.width for rows in self.rows)
        return None

    def owners(self, device: torch.device) -> torch.Tensor:
        """Each row's group index, as a tensor."""
        return torch.arange(len(self.rows), device=device).repeat_interleave(torch.tensor(self.rows, device=device))

    def slices(self) -> list[slice]:
        """Each group's rows of the concatenated batch."""
        bounds, start = [], 0
        for rows in self.rows:
            bounds.append(slice(start, start + rows))
            start += rows
        return bounds


def concatenate(
    batches: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int
) -> tuple[dict[str, torch.Tensor], RowGroups]:
    """One right-padded batch of every group's rows, in order (the collator's padding: pad id, label -100, mask 0).

    Extra right padding changes nothing a real token sees: causal attention never reads later
    positions, and padded positions carry no label.
    """
    width = max(batch["input_ids"].shape[1] for batch in batches)
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    keys = set(batches[0])
    if any(set(batch) != keys for batch in batches) or not keys <= set(fill):
        raise BatchingError(f"batched clients need batches of {sorted(fill)}; got {sorted(keys)}")
    joined = {}
    for key in keys:
        parts = [nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=fill[key]) for batch in batches]
        joined[key] = torch.cat(parts)
    rows = tuple(batch["input_ids"].shape[0] for batch in batches)
    return joined, RowGroups(rows, width, tuple(batch["input_ids"].shape[1] for batch in batches))


@dataclass
class ClientRandom:
    """One client's random stream (the CPU generator's, and the CUDA one's on a GPU), carried between calls."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> ClientRandom:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """Draw from this stream inside the block (the surrounding stream is restored after, this one kept)."""
        outer = ClientRandom.capture(device)
        self.restore(device)
        try:
            yield
        finally:
            inner = ClientRandom.capture(device)
            self.cpu, self.cuda = inner.cpu, inner.cuda
            outer.restore(device)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


Owners = dict[str, tuple[nn.Module, dict[str, str]]]
"""What :func:`units` returns: by module name, the module and its local parameter names mapped to full names."""


def units(model: nn.Module, varying: Sequence[str]) -> Owners:
    """The modules that own (directly) a parameter named in ``varying``: by module name, the module and its
    local parameter names mapped to the ``varying`` names.

    Parameters are matched by identity: a tied weight (embeddings and LM head) has one name in
    ``named_parameters`` but two owners, both of which must read the client's tensor.
    """
    wanted = set(varying)
    canonical = {id(param): name for name, param in model.named_parameters()}
    found: Owners = {}
    for name, module in model.named_modules():
        local = {key: canonical[id(param)] for key, param in module.named_parameters(recurse=False)}
        chosen = {key: full for key, full in local.items() if full in wanted}
        if chosen:
            found[name] = (module, chosen)
    missing = wanted - {full for _, chosen in found.values() for full in chosen.values()}
    if missing:
        raise BatchingError(f"no module owns the varying tensors {sorted(missing)[:3]}")
    return found


def stack_clients(tensors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every client's tensors of one name stacked along a new first dimension (client ``g`` at index ``g``)."""
    return {name: torch.stack([chosen[name] for chosen in tensors]) for name in tensors[0]}


@contextmanager
def grouped_forwards(
    model: nn.Module,
    stacked: Mapping[str, torch.Tensor],
    groups: RowGroups,
    randoms: Sequence[ClientRandom] | None = None,
    *,
    owners: Owners | None = None,
) -> Iterator[None]:
    """Inside the block, ``model``'s forwards run each group of rows through its own client's tensors.

    ``stacked`` maps parameter names of ``model`` to every client's tensors stacked along a first
    dimension, one per row group (:func:`stack_clients`); gradients flow back through it.
    ``randoms[g]`` is client ``g``'s random stream for dropout modules. ``owners`` is
    :func:`units` of ``model`` for these names, when the caller computed it once for many steps.
    """
    counts = {name: tensor.shape[0] for name, tensor in stacked.items()}
    if set(counts.values()) != {len(groups.rows)}:
        depths = sorted(set(counts.values()))
        raise BatchingError(f"clients' tensors stacked {depths} deep for {len(groups.rows)} row groups")
    device = next(iter(stacked.values())).device
    patched: list[nn.Module] = []
    try:
        for prefix, (unit, names) in (owners if owners is not None else units(model, list(stacked))).items():
            local = {key: stacked[full] for key, full in names.items()}
            vars(unit)["forward"] = _GroupedForward(unit, local, groups, prefix)  # shadows the class forward
            patched.append(unit)
        if randoms is not None:
            for module in model.modules():
                if isinstance(module, nn.Dropout) and module.p > 0 and module not in patched:
                    vars(module)["forward"] = _GroupedDropout(module, randoms, groups, device)
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del vars(module)["forward"]


class _GroupedForward:
    """A unit's forward while grouped: split, run per group with that client's tensors, concatenate.

    The unit's own forward runs once per group with the group's tensors in place of its parameters;
    its hooks run once, around the whole grouped call, as they would around one client's call. Two
    kinds of unit run as one call instead: an ``nn.Linear`` over groups of equal size (a batched
    matmul, :func:`_stacked_linear`) and a transformers experts module whose every tensor varies
    (:func:`_stacked_experts`).
    """

    def __init__(self, unit: nn.Module, stacked: dict[str, torch.Tensor], groups: RowGroups, name: str) -> None:
        self.unit, self.stacked, self.groups, self.name = unit, stacked, groups, name
        self.experts = _fused_experts_count(unit, stacked)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leading = _leading(args, kwargs)
        sizes = self.groups.sizes(leading) if leading is not None else None
        if sizes is None:
            raise BatchingError(
                f"{self.name or type(self.unit).__name__} runs on {leading} rows, neither the batch's "
                f"{self.groups.total} rows nor its {self.groups.total * self.groups.width} tokens: its clients "
                "cannot be told apart"
            )
        if isinstance(self.unit, nn.Linear) and len(set(sizes)) == 1 and len(args) == 1 and not kwargs:
            return _stacked_linear(args[0], self.stacked["weight"], self.stacked.get("bias"))
        if self.experts is not None and len(args) == 3 and not kwargs:
            return _stacked_experts(self.unit, self.stacked, self.experts, sizes, *args)
        outputs = []
        for index in range(len(sizes)):
            with _swapped(self.unit, {key: tensor[index] for key, tensor in self.stacked.items()}):
                outputs.append(
                    type(self.unit).forward(self.unit, *_split(args, sizes, index), **_split(kwargs, sizes, index))
                )
        return _join_outputs(outputs)


def _fused_experts_count(unit: nn.Module, stacked: Mapping[str, torch.Tensor]) -> int | None:
    """The expert count of a transformers experts module (3-D tensors, ``num_experts``) whose every tensor varies."""
    experts = vars(unit).get("num_experts")  # an instance attribute, which the joined call can set for a moment
    if not isinstance(experts, int) or not hasattr(unit, "config") or set(stacked) != set(unit._parameters):
        return None
    if any(tensor.dim() < 3 or tensor.shape[1] != experts for tensor in stacked.values()):
        return None
    return experts


def _stacked_experts(
    unit: nn.Module,
    stacked: Mapping[str, torch.Tensor],
    experts: int,
    sizes: tuple[int, ...],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """A transformers experts module over every group at once: the k clients' E experts as k x E experts.

    Group ``g``'s tokens route to experts ``g x E + i``; an index of ``E`` or more (transformers'
    sentinel for a slot no local expert takes) stays a sentinel (``k x E``). The module's own forward
    runs once, with whatever experts implementation the model is set to.
    """
    count = len(sizes)
    if len(set(sizes)) == 1 and _every_token_to_every_expert(unit, top_k_index, experts, stacked):
        return _dense_stacked_experts(unit, stacked, count, hidden, top_k_weights)
    base = torch.arange(count, device=top_k_index.device).mul_(experts)
    offsets = base.repeat_interleave(torch.tensor(sizes, device=top_k_index.device)).unsqueeze(1)
    shifted = torch.where(top_k_index < experts, top_k_index + offsets, count * experts)
    joined = {key: tensor.flatten(0, 1) for key, tensor in stacked.items()}
    vars(unit)["num_experts"] = count * experts  # read by every experts implementation
    try:
        with _swapped(unit, joined):
            return type(unit).forward(unit, hidden, shifted.to(top_k_index.dtype), top_k_weights)
    finally:
        vars(unit)["num_experts"] = experts


_EXPERT_TENSORS = {"gate_up_proj", "down_proj"}
_EXPERT_BIASES = {"gate_up_proj_bias", "down_proj_bias"}


def _every_token_to_every_expert(
    unit: nn.Module, top_k_index: torch.Tensor, experts: int, stacked: Mapping[str, torch.Tensor]
) -> bool:
    """Whether every token goes to each of the module's experts (FLEx's personal experts: ``arange(E)`` expanded)
    and the module is a plain gated one (``gate_up_proj``, ``down_proj``, optional biases)."""
    plain = getattr(unit, "has_gate", False) and not getattr(unit, "has_post_expert_norm", False)
    if not plain or not _EXPERT_TENSORS <= set(stacked) <= _EXPERT_TENSORS | _EXPERT_BIASES:
        return False
    if top_k_index.dim() != 2 or top_k_index.shape[1] != experts or top_k_index.stride(0) != 0:
        return False
    return torch.equal(top_k_index[0], torch.arange(experts, device=top_k_index.device))


def _dense_stacked_experts(
    unit: nn.Module, stacked: Mapping[str, torch.Tensor], count: int, hidden: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Every token of equal groups through each of its own client's experts: batched matmuls over (client, expert).

    The same arithmetic as transformers' experts forward (gated up projection, the module's own
    gate, down projection, routing weight, sum over experts) without routing every token by a sort.
    """
    tokens, width = hidden.shape
    experts = stacked["down_proj"].shape[1]
    per_group = tokens // count
    spread = hidden.reshape(count, 1, per_group, width).expand(count, experts, per_group, width)

    def project(inputs: torch.Tensor, name: str) -> torch.Tensor:
        bias = stacked.get(f"{name}_bias")
        flat_bias = None if bias is None else bias.flatten(0, 1)
        return dense_projection(inputs, stacked[name].flatten(0, 1), flat_bias, bool(unit.is_transposed))

    gated = apply_gate(unit, project(spread.reshape(count * experts, per_group, width), "gate_up_proj"))
    out = project(gated, "down_proj").reshape(count, experts, per_group, -1)
    routing = weights.reshape(count, per_group, experts).transpose(1, 2).unsqueeze(-1).to(out.dtype)
    return (out * routing).sum(dim=1).reshape(tokens, -1).to(hidden.dtype)


@contextmanager
def _swapped(unit: nn.Module, chosen: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``unit``'s parameters named in ``chosen`` read as those tensors inside the block (autograd flows to them)."""
    saved = {key: unit._parameters[key] for key in chosen}
    try:
        for key, tensor in chosen.items():
            unit._parameters[key] = tensor  # type: ignore[assignment]  # read back through nn.Module.__getattr__
        yield
    finally:
        for key, parameter in saved.items():
            unit._parameters[key] = parameter


class _GroupedDropout:
    """Dropout drawing each group's mask from that client's random stream, over the positions of its own batch.

    A client alone draws a mask of its own batch's shape; inside the wider concatenated batch its rows
    are cut back to their own width for the draw (positions past it are padding, which no real token
    reads), so the masks are the ones it draws alone.
    """

    def __init__(self, module: nn.Dropout, randoms: Sequence[ClientRandom], groups: RowGroups, device: torch.device):
        self.module, self.randoms, self.groups, self.device = module, randoms, groups, device

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.module.training:
            return hidden
        groups = self.groups
        sizes = groups.sizes(hidden.shape[0])
        if sizes is None:
            raise BatchingError(f"dropout over {hidden.shape[0]} rows: its clients cannot be told apart")
        flat = sizes != groups.rows
        parts = []
        for random, part, rows, own in zip(
            self.randoms, hidden.split(list(sizes)), groups.rows, groups.own_widths, strict=True
        ):
            shaped = part.reshape(rows, groups.width, *part.shape[1:]) if flat else part
            positional = shaped.dim() > 1 and shaped.shape[1] == groups.width
            drawn = shaped[:, :own].contiguous() if positional else shaped
            with random.active(self.device):
                dropped = type(self.module).forward(self.module, drawn)
            if positional and own < groups.width:
                tail = (0, 0) * (dropped.dim() - 2) + (0, groups.width - own)
                dropped = nn.functional.pad(dropped, tail)
            parts.append(dropped.reshape(part.shape))
        return torch.cat(parts)


def _stacked_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``nn.Linear`` for equal groups as one batched matmul over the groups' stacked ``(k, out, in)`` weights."""
    grouped = hidden.reshape(weight.shape[0], -1, hidden.shape[-1])
    if bias is None:
        out = torch.bmm(grouped, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), grouped, weight.transpose(1, 2))
    return out.reshape(*hidden.shape[:-1], weight.shape[1])


def _leading(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _split(values: Any, sizes: tuple[int, ...], index: int) -> Any:
    """Group ``index``'s part of every tensor whose first dimension the groups split; anything else as it is."""
    if isinstance(values, dict):
        return {key: _split(value, sizes, index) for key, value in values.items()}
    if isinstance(values, tuple):
        return tuple(_split(value, sizes, index) for value in values)
    if isinstance(values, torch.Tensor) and values.dim() > 0 and values.shape[0] == sum(sizes):
        start = sum(sizes[:index])
        return values[start : start + sizes[index]]
    return values


def _join_outputs(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return tuple(_join_outputs([output[i] for output in outputs]) for i in range(len(first)))
    if first is None:
        return None
    raise BatchingError(f"a grouped module returned {type(first).__name__}, which cannot be joined by rows")

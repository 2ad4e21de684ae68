"""Row groups: one forward over several clients' batches, each group of rows through its own client's tensors.

The frozen base is shared by every client, so k clients' batches can go through it as one
concatenated batch; only the modules that own a client's trainable tensors (attention LoRA's
factors, FLEx's personal experts and gate, ...) must see each client's rows apart. While
:func:`grouped_forwards` is active, each such module (a *unit*: one that owns a varying parameter
directly) splits its tensor inputs along the first dimension by group, runs its own forward once per
group with that client's tensors in place of its parameters (so any module works, whatever its
forward does) and concatenates the results. An ``nn.Linear`` unit over groups of equal size is one
batched matmul over the stacked weights instead (multi-LoRA serving's segmented matmul, in its
simplest form). Dropout modules draw each group's mask from that client's own random stream, so a
batched client draws exactly the masks it would draw alone.

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


def units(model: nn.Module, varying: Sequence[str]) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """The modules that own (directly) a parameter named in ``varying``: by module name, the module and its
    local parameter names mapped to the ``varying`` names.

    Parameters are matched by identity: a tied weight (embeddings and LM head) has one name in
    ``named_parameters`` but two owners, both of which must read the client's tensor.
    """
    wanted = set(varying)
    canonical = {id(param): name for name, param in model.named_parameters()}
    found: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for name, module in model.named_modules():
        local = {key: canonical[id(param)] for key, param in module.named_parameters(recurse=False)}
        chosen = {key: full for key, full in local.items() if full in wanted}
        if chosen:
            found[name] = (module, chosen)
    missing = wanted - {full for _, chosen in found.values() for full in chosen.values()}
    if missing:
        raise BatchingError(f"no module owns the varying tensors {sorted(missing)[:3]}")
    return found


@contextmanager
def grouped_forwards(
    model: nn.Module,
    tensors: Sequence[Mapping[str, torch.Tensor]],
    groups: RowGroups,
    randoms: Sequence[ClientRandom] | None = None,
) -> Iterator[None]:
    """Inside the block, ``model``'s forwards run each group of rows through its own client's ``tensors``.

    ``tensors[g]`` maps parameter names of ``model`` to client ``g``'s tensors (the same names for
    every group). ``randoms[g]`` is client ``g``'s random stream for dropout modules.
    """
    if len(tensors) != len(groups.rows):
        raise BatchingError(f"{len(tensors)} clients' tensors for {len(groups.rows)} row groups")
    device = next(iter(tensors[0].values())).device
    patched: list[nn.Module] = []
    try:
        for prefix, (unit, names) in units(model, list(tensors[0])).items():
            per_group = [{key: chosen[full] for key, full in names.items()} for chosen in tensors]
            vars(unit)["forward"] = _GroupedForward(unit, per_group, groups, prefix)  # shadows the class forward
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
    its hooks run once, around the whole grouped call, as they would around one client's call.
    """

    def __init__(self, unit: nn.Module, per_group: list[dict[str, torch.Tensor]], groups: RowGroups, name: str) -> None:
        self.unit, self.per_group, self.groups, self.name = unit, per_group, groups, name

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
            return _stacked_linear(args[0], self.per_group, len(sizes))
        outputs = []
        for index, chosen in enumerate(self.per_group):
            with _swapped(self.unit, chosen):
                outputs.append(
                    type(self.unit).forward(self.unit, *_split(args, sizes, index), **_split(kwargs, sizes, index))
                )
        return _join_outputs(outputs)


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


def _stacked_linear(hidden: torch.Tensor, per_group: list[dict[str, torch.Tensor]], count: int) -> torch.Tensor:
    """``nn.Linear`` for ``count`` equal groups as one batched matmul over the groups' stacked weights."""
    weight = torch.stack([chosen["weight"] for chosen in per_group])  # (k, out, in)
    grouped = hidden.reshape(count, -1, hidden.shape[-1])
    out = torch.bmm(grouped, weight.transpose(1, 2))
    if "bias" in per_group[0]:
        out = out + torch.stack([chosen["bias"] for chosen in per_group]).unsqueeze(1)
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

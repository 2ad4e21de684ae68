"""A plan rendered for the terminal: one plan as a table, or several side by side.

:mod:`fedexperts.planning` computes a :class:`~fedexperts.planning.Plan` (data only); this module
turns it into rich tables with human-readable counts (``6.92B``) and binary byte sizes (``8.00 MiB``),
the way ``fedexperts plan`` prints it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from fedexperts.moe.params import Role

if TYPE_CHECKING:
    import torch

    from fedexperts.planning import Plan


def human_count(count: int) -> str:
    """``6919161856`` -> ``6.92B``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def human_bytes(size: int) -> str:
    """Binary units: ``8388608`` -> ``8.00 MiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.2f} {unit}"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "as stored" if dtype is None else str(dtype).removeprefix("torch.")


_MEMORY_NOTE = "client memory = weights + gradients + AdamW state; activations are not included"


def plan_table(result: Plan) -> Table:
    """One plan as a table: model, parameters by kind and role, bytes per round, client memory."""
    table = Table(
        title=f"fedexperts plan: {result.model} with {result.algorithm}",
        caption=f"{_MEMORY_NOTE} (they grow with batch size x sequence length)",
    )
    table.add_column("")
    table.add_column("parameters / size", justify="right")
    table.add_column("detail")
    table.add_row(
        "model",
        "",
        f"{result.family} ({result.model_type}), {result.moe_layers} MoE layers x {result.num_experts} experts, "
        f"top-{result.top_k}",
    )
    if result.note is not None:
        table.add_row("note", "", result.note)
    table.add_row("parameters", human_count(result.base_params), f"{result.base_params:,} (the checkpoint's)")
    table.add_row("active per token", human_count(result.active_params), f"{result.active_params:,}")
    table.add_section()
    for row in result.by_kind:
        roles = ", ".join(f"{role.value} {human_count(count)}" for role, count in row.by_role.items() if count)
        table.add_row(f"  {row.label}", human_count(row.params), roles)
    table.add_section()
    for role in Role:
        table.add_row(role.value, human_count(result.by_role[role]), f"{result.by_role[role]:,}")
    table.add_row("trainable", human_count(result.trainable_params), f"{result.trainable_params:,}")
    table.add_section()
    wire = f"safetensors, transfer dtype {_dtype_name(result.transfer_dtype)}"
    table.add_row(
        "downlink / client / round",
        human_bytes(result.downlink_bytes),
        f"{result.downlink_bytes:,} B, {result.downlink_tensors} tensors ({wire})",
    )
    table.add_row(
        "uplink / client / round",
        human_bytes(result.uplink_bytes),
        f"{result.uplink_bytes:,} B, {result.uplink_tensors} tensors ({wire})",
    )
    table.add_row("personal state kept", human_bytes(result.personal_bytes), f"{result.personal_bytes:,} B")
    table.add_section()
    memory = result.memory
    table.add_row("weights", human_bytes(memory.weights), f"{_dtype_name(result.dtype)} parameters and buffers")
    table.add_row("gradients", human_bytes(memory.gradients), "trainable parameters only")
    table.add_row("AdamW state", human_bytes(memory.optimizer), "exp_avg + exp_avg_sq in the parameters' dtype")
    table.add_row("client memory", human_bytes(memory.total), "activations not included")
    return table


def comparison_table(plans: list[Plan]) -> Table:
    """Several plans side by side, one row each (e.g. every preset under one algorithm)."""
    algorithms = sorted({result.algorithm for result in plans})
    dtypes = sorted({_dtype_name(result.dtype) for result in plans})
    wires = sorted({_dtype_name(result.transfer_dtype) for result in plans})
    table = Table(
        title=f"fedexperts plan: {', '.join(algorithms)}, weights {', '.join(dtypes)}, transfer {', '.join(wires)}",
        caption=_MEMORY_NOTE,
    )
    for column in ("model", "type", "params", "active", "trainable", "shared", "personal"):
        table.add_column(column, justify="left" if column in ("model", "type") else "right")
    for column in ("down/round", "up/round", "client memory"):
        table.add_column(column, justify="right")
    for result in plans:
        table.add_row(
            result.model,
            result.model_type,
            human_count(result.base_params),
            human_count(result.active_params),
            human_count(result.trainable_params),
            human_count(result.by_role[Role.SHARED]),
            human_count(result.by_role[Role.PERSONAL]),
            human_bytes(result.downlink_bytes),
            human_bytes(result.uplink_bytes),
            human_bytes(result.memory.total),
        )
    return table

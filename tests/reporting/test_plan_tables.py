"""Rendering a plan: human-readable counts and sizes, and the tables ``fedexperts plan`` prints."""

import torch
from rich.console import Console

from fedexperts.moe import Role
from fedexperts.planning import KindCount, MemoryEstimate, Plan
from fedexperts.reporting.plan_tables import comparison_table, human_bytes, human_count, plan_table


def sample_plan(model: str = "tiny", transfer_dtype: torch.dtype | None = None) -> Plan:
    by_role = dict.fromkeys(Role, 0) | {Role.SHARED: 4096, Role.FROZEN: 1_000_000}
    return Plan(
        model=model,
        model_type="olmoe",
        family="OLMoE",
        algorithm="fedavg",
        dtype=torch.bfloat16,
        transfer_dtype=transfer_dtype,
        moe_layers=2,
        num_experts=8,
        top_k=2,
        base_params=1_000_000,
        active_params=400_000,
        total_params=1_004_096,
        trainable_params=4096,
        by_role=by_role,
        by_kind=(KindCount("attention", True, 4096, {Role.SHARED: 4096}),),
        downlink_bytes=8_388_608,
        uplink_bytes=8200,
        downlink_tensors=4,
        uplink_tensors=4,
        personal_bytes=0,
        memory=MemoryEstimate(weights=2_000_000, gradients=8192, optimizer=16_400),
    )


def rendered(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_counts_and_sizes_read_as_people_write_them():
    assert human_count(6919161856) == "6.92B"
    assert human_count(1_500_000) == "1.50M"
    assert human_count(999) == "999"
    assert human_bytes(8388608) == "8.00 MiB"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(2048) == "2.00 KiB"
    assert human_bytes(5 * 1024**4) == "5120.00 GiB"  # GiB is the largest unit


def test_plan_table_shows_every_section_from_the_plan_alone():
    text = rendered(plan_table(sample_plan()))
    assert "fedexperts plan: tiny with fedavg" in text
    assert "OLMoE (olmoe), 2 MoE layers x 8 experts, top-2" in text
    assert "attention LoRA" in text
    assert "8,388,608 B, 4 tensors (safetensors, transfer dtype as stored)" in text
    assert "bfloat16 parameters and buffers" in text
    assert "activations not included" in text


def test_comparison_table_has_one_row_per_plan_and_names_the_shared_settings():
    plans = [sample_plan("one"), sample_plan("two", torch.float16)]
    text = rendered(comparison_table(plans))
    assert "fedexperts plan: fedavg, weights bfloat16, transfer as stored, float16" in text
    assert "one" in text and "two" in text
    assert "activations are not included" in text

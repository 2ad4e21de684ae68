"""Grafting selection: one batched pass over all experts vs. one forward per expert.

Both methods score every routed expert of every MoE layer on the same calibration batches of the
same random-weight OLMoE-style model, side by side in one run; the script prints the median wall
time of each over several repetitions, the ratio, and checks that both pick the same experts.

    python -m benchmarks.grafting_selection                 # 8, 32, 64 experts; 512 tokens
    python -m benchmarks.grafting_selection --experts 8 32 64 128 --tokens 2048 --repeats 5

On a CPU the per-expert loop is compute-bound like the one-pass method once the calibration set is
large, so the gap is the per-call dispatch overhead that the one-pass method removes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks.common import Table
from fedexperts.models import tiny_model
from fedexperts.moe import SelectionMethod, reconstruction_losses


def time_method(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], method: SelectionMethod) -> float:
    start = time.perf_counter()
    reconstruction_losses(model, batches, method=method)
    return time.perf_counter() - start


def run(
    experts: Sequence[int] = (8, 32, 64),
    tokens: Sequence[int] = (512,),
    *,
    hidden: int = 256,
    intermediate: int = 128,
    layers: int = 2,
    repeats: int = 3,
) -> Table:
    table = Table(
        "Grafting selection: one pass over all experts vs. one forward per expert (median seconds)",
        ["experts", "tokens", "one-pass (s)", "per-expert (s)", "speed-up", "same choice"],
    )
    table.note(f"OLMoE-style, hidden {hidden}, expert intermediate {intermediate}, {layers} MoE layers")
    torch.manual_seed(0)
    for count, tokens_ in [(e, t) for t in tokens for e in experts]:
        model = tiny_model(
            "olmoe",
            num_experts=count,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
        generator = torch.Generator().manual_seed(count)
        batches = [{"input_ids": torch.randint(3, 512, (4, tokens_ // 4), generator=generator)}]
        fast = reconstruction_losses(model, batches, method=SelectionMethod.ONE_PASS)
        slow = reconstruction_losses(model, batches, method=SelectionMethod.PER_EXPERT)
        same = all(fast[name].best == slow[name].best for name in fast)
        one_pass, per_expert = [], []
        for _ in range(repeats):  # interleaved so that machine noise hits both alike
            one_pass.append(time_method(model, batches, SelectionMethod.ONE_PASS))
            per_expert.append(time_method(model, batches, SelectionMethod.PER_EXPERT))
        fast_s, slow_s = statistics.median(one_pass), statistics.median(per_expert)
        table.add(count, tokens_, f"{fast_s:.3f}", f"{slow_s:.3f}", f"{slow_s / fast_s:.2f}x", "yes" if same else "NO")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512], help="calibration tokens (4 sequences)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = run(
        args.experts,
        args.tokens,
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        repeats=args.repeats,
    )
    print(table.markdown())


if __name__ == "__main__":
    main()

"""Grafting selection: one batched pass over all experts vs. one forward per expert.

Both methods score every routed expert of every MoE layer on the same calibration batches of the
same random-weight OLMoE-style model, side by side in one run; the script prints the median wall
time of each over several repetitions, the ratio, and checks that both pick the same experts.

    python benchmarks/grafting_selection.py                 # 32, 64, 128 experts; 64 and 512 tokens
    python benchmarks/grafting_selection.py --experts 8 32 64 --tokens 2048 --repeats 5

On a CPU the per-expert loop is compute-bound like the one-pass method once the calibration set is
large, so the gap is the per-call dispatch overhead that the one-pass method removes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from fedexperts.models import tiny_model
from fedexperts.moe import SelectionMethod, reconstruction_losses


def time_method(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], method: SelectionMethod) -> float:
    start = time.perf_counter()
    reconstruction_losses(model, batches, method=method)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512], help="calibration tokens (4 sequences)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    print(
        f"# grafting selection, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"# OLMoE-style, hidden {args.hidden}, expert intermediate {args.intermediate}, {args.layers} MoE layers, "
        f"median of {args.repeats}"
    )
    print("| experts | tokens | one-pass (s) | per-expert (s) | speed-up | same choice |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for experts, tokens in [(e, t) for t in args.tokens for e in args.experts]:
        model = tiny_model(
            "olmoe",
            num_experts=experts,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
        length = tokens // 4
        generator = torch.Generator().manual_seed(experts)
        batches = [{"input_ids": torch.randint(3, 512, (4, length), generator=generator)}]
        fast = reconstruction_losses(model, batches, method=SelectionMethod.ONE_PASS)
        slow = reconstruction_losses(model, batches, method=SelectionMethod.PER_EXPERT)
        same = all(fast[name].best == slow[name].best for name in fast)
        one_pass, per_expert = [], []
        for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
            one_pass.append(time_method(model, batches, SelectionMethod.ONE_PASS))
            per_expert.append(time_method(model, batches, SelectionMethod.PER_EXPERT))
        fast_s, slow_s = statistics.median(one_pass), statistics.median(per_expert)
        print(
            f"| {experts} | {tokens} | {fast_s:.3f} | {slow_s:.3f} | {slow_s / fast_s:.2f}x "
            f"| {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()

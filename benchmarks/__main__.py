"""Run every benchmark and write docs/PERFORMANCE.md (``make bench`` / ``python -m benchmarks``).

Each benchmark measures its comparisons side by side in one run and reports medians and ratios;
the document records the machine they ran on and the command that regenerates it.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from benchmarks import grafting_selection, memory, payloads, rounds, scale, training, transfer
from benchmarks.common import machine

HEADER = """# Performance

Written by `python -m benchmarks` (or `make bench`); every number below comes from that one run,
on the machine named here. Comparisons inside a table were measured side by side, interleaved, in
the same run; ratios are of medians. These machines are shared and noisy: read ratios, not
absolute times.

Machine: {machine}. Run: {date}, {minutes:.1f} minutes.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/PERFORMANCE.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    sections = []
    for name, bench in (
        ("training", training.run),
        ("experts implementations", training.run_implementations),
        ("profile", training.run_profile),
        ("round overhead", rounds.run),
        ("payloads", payloads.run),
        ("half-precision transfer", transfer.run),
        ("memory", memory.run),
        ("scale", scale.run),
        ("grafting selection", grafting_selection.run),
    ):
        print(f"running {name} ...", flush=True)
        table = bench()
        print(table.markdown(), flush=True)
        sections.append(table.markdown())
    minutes = (time.perf_counter() - start) / 60
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    args.out.write_text(HEADER.format(machine=machine(), date=date, minutes=minutes) + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Run every benchmark and write docs/PERFORMANCE.md (``make bench`` / ``python -m benchmarks``).

Each benchmark runs in its own Python process (so that one's memory does not show in another's
figures), measures its comparisons side by side in that run and prints markdown tables of
medians and ratios; this collects them under the machine they ran on.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine

MODULES = ("training", "batched", "rounds", "nodes", "payloads", "transfer", "memory", "scale", "grafting_selection")

HEADER = """# Performance

Written by `python -m benchmarks` (or `make bench`); every number below comes from that one run,
on the machine named here. Comparisons inside a table were measured side by side, interleaved, in
the same run; ratios are of medians. These machines are shared and noisy: read ratios, not
absolute times. Each table says what its numbers mean underneath.

Machine: {machine}. Run: {date}, {minutes:.1f} minutes.

"""


def tables(module: str) -> str:
    """The markdown tables ``python -m benchmarks.MODULE`` prints (its progress output left out)."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.{module} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    text = done.stdout
    return text[text.index("### ") :].rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/PERFORMANCE.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    sections = []
    for module in MODULES:
        print(f"running benchmarks.{module} ...", flush=True)
        sections.append(tables(module))
        print(sections[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    args.out.write_text(HEADER.format(machine=machine(), date=date, minutes=minutes) + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

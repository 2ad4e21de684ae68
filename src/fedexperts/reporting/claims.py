"""The papers' claims against the studies' runs: one row per claim and study, regenerated from the run folders.

A claim says that one method beats another on one metric (FLEx over local training on the
personalized score, FedMoE over randomMoE, ...). Its verdict reads the paired difference by seed
(:mod:`fedexperts.reporting.paired`) of the study's finished runs:

- **reproduced**: the 95% interval excludes 0 on the claimed side;
- **refuted**: it excludes 0 on the other side;
- **not reproduced**: it contains 0 (the row says the smallest difference those seeds could detect);
- **not run**: the study folder has no finished runs of one of the two methods;
- **not testable here**: the setting cannot test the claim (the row says why, and where it is measured).

``fedexperts claims STUDIES_DIR`` prints the table; ``--write docs/RESULTS.md`` replaces the part of the
file between :data:`BEGIN` and :data:`END` with it, so rerunning the studies rewrites the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedexperts.atomic import atomic_file
from fedexperts.errors import FedExpertsError
from fedexperts.reporting import format as fmt
from fedexperts.reporting.compare import METRICS, Comparison, compare
from fedexperts.reporting.paired import paired_cell
from fedexperts.reporting.paper_layout import paper_metrics
from fedexperts.reporting.runs import RunRecord, load_run
from fedexperts.reporting.schema import METRICS_FILE
from fedexperts.studies import FEDMOE_TASKS

BEGIN = "<!-- claims:begin (fedexperts claims STUDIES_DIR --write FILE rewrites this part) -->"
END = "<!-- claims:end -->"
_CLAIM_METRICS = (*METRICS, *paper_metrics(FEDMOE_TASKS))
_METRIC_LABELS = {metric.key: metric.label for metric in _CLAIM_METRICS}
_FLEX_STUDIES = ("flex-pathological", "flex-dirichlet-0.5", "flex-dirichlet-1.0")
_FEDMOE_PAPER_STUDIES = ("fedmoe-paper", "fedmoe-paper-distinct")


@dataclass(frozen=True)
class Claim:
    """``method`` beats ``baseline`` on ``metric`` in ``study``, as ``paper`` reports ``paper_number``."""

    paper: str
    text: str
    paper_number: str
    study: str
    metric: str
    method: str
    baseline: str
    untestable: str | None = None
    """Why this setting cannot test the claim (and where it is measured), for a row without a verdict."""


def _flex_claims(study: str) -> list[Claim]:
    retained = "the highest MMLU of the compared methods (49.74, Qwen1.5-MoE)"
    return [
        Claim(
            "FLEx",
            "personalizes better than local-only training",
            "above local on every split (paper's tables, Dolly-15k)",
            study,
            "personalized_rouge_l",
            "flex",
            "local",
        ),
        Claim(
            "FLEx",
            "personalizes better than FedAvg",
            "reported average ROUGE-L 43.13 vs 42.37 for the best federated baseline",
            study,
            "personalized_rouge_l",
            "flex",
            "fedavg",
        ),
        Claim(
            "FLEx",
            "grafts an expert that beats a random expert trained personally",
            "above the random-experts baseline (paper's ablation)",
            study,
            "personalized_rouge_l",
            "flex",
            "random-expert",
        ),
        Claim("FLEx", "retains knowledge better than FedAvg", retained, study, "probes", "flex", "fedavg"),
        Claim("FLEx", "retains knowledge better than MoE-as-dense", retained, study, "probes", "flex", "dense"),
        Claim(
            "FLEx",
            "sends fewer bytes than MoE-as-dense",
            "only shared non-expert parameters travel",
            study,
            "bytes_per_client_round",
            "flex",
            "dense",
        ),
    ]


def _fedmoe_paper_claims(study: str) -> list[Claim]:
    fedmoe, baseline = "fedmoe@switch-32", "dense@switch-8"
    per_task = [
        Claim(
            "FedMoE",
            f"beats randomly chosen sub-MoEs on the {category} task",
            "above randomMoE on each task type (paper's tables; not transcribed here)",
            study,
            f"task_{category}_{score}",
            fedmoe,
            "random-moe@switch-32",
        )
        for category, score in FEDMOE_TASKS.items()
    ]
    return [
        *per_task,
        Claim(
            "FedMoE",
            "holds less on a client than FedAvg's full model (memory)",
            "less memory than the FedAvg baseline (paper's tables; not transcribed here)",
            study,
            "client_model_gb",
            fedmoe,
            baseline,
        ),
        Claim(
            "FedMoE",
            "communicates less than FedAvg of the full model",
            "less communication than the FedAvg baseline (paper's tables; not transcribed here)",
            study,
            "total_traffic_gb",
            fedmoe,
            baseline,
        ),
    ]


CLAIMS: tuple[Claim, ...] = (
    *(claim for study in _FLEX_STUDIES for claim in _flex_claims(study)),
    Claim(
        "FedMoE",
        "picks sub-MoEs (search, recommendation) that beat randomly chosen ones",
        "above randomMoE on its task mix (paper's tables; not transcribed here)",
        "fedmoe-experts32",
        "personalized_rouge_l",
        "fedmoe",
        "random-moe",
    ),
    Claim(
        "FedMoE",
        "lets a budget client hold only its sub-MoE (memory)",
        "sub-MoE memory below the full model's",
        "fedmoe-experts32",
        "peak_memory_bytes",
        "fedmoe",
        "random-moe",
        untestable="both methods hold sub-MoEs of the same budget; `python -m benchmarks.memory` measures "
        "sub-MoE against full-model memory (docs/fedmoe.md)",
    ),
    Claim(
        "FedMoE",
        "sends less than the full MoE (communication)",
        "only held experts' rows travel",
        "fedmoe-experts32",
        "bytes_per_client_round",
        "fedmoe",
        "random-moe",
        untestable="randomMoE sends the same rows by design; `fedexperts plan MODEL --algorithm fedmoe` "
        "against `--algorithm dense` gives the bytes",
    ),
    *(claim for study in _FEDMOE_PAPER_STUDIES for claim in _fedmoe_paper_claims(study)),
)


@dataclass(frozen=True)
class ClaimRow:
    claim: Claim
    ours: str
    verdict: str


def _finished_runs(folder: Path) -> list[RunRecord]:
    runs = []
    for seed_dir in sorted(folder.glob("seed-*")):
        if (seed_dir / METRICS_FILE).is_file():
            run = load_run(seed_dir)
            if run.finished:
                runs.append(run)
    return runs


def _row(claim: Claim, comparison: Comparison | None) -> ClaimRow:
    if claim.untestable is not None:
        return ClaimRow(claim, fmt.MISSING, f"not testable here: {claim.untestable}")
    if comparison is None:
        return ClaimRow(claim, fmt.MISSING, f"not run: `fedexperts compare --study {claim.study}`")
    metric = comparison.metric(claim.metric)
    item = comparison.paired(claim.metric, claim.method, claim.baseline)
    ours = f"{paired_cell(metric, item)}, n={item.n}"
    if item.interval is None:
        return ClaimRow(claim, ours, "not reproduced: fewer than two paired seeds")
    if not item.excludes_zero:
        detectable = fmt.MISSING if item.detectable is None else metric.show(item.detectable)
        return ClaimRow(claim, ours, f"not reproduced: no difference shown (detectable at n={item.n}: {detectable})")
    better = (item.mean or 0.0) > 0 if metric.higher_is_better else (item.mean or 0.0) < 0
    return ClaimRow(claim, ours, "reproduced" if better else f"refuted: {claim.baseline} is better")


def claim_rows(studies_dir: str | Path, claims: Sequence[Claim] = CLAIMS) -> list[ClaimRow]:
    """Each claim's paired difference and verdict from the finished runs under ``studies_dir/STUDY/METHOD/seed-N``."""
    folder = Path(studies_dir)
    if not folder.is_dir():
        raise FedExpertsError(f"studies folder {folder} does not exist (it holds one folder per study)")
    loaded: dict[tuple[str, str], list[RunRecord]] = {}

    def runs(study: str, method: str) -> list[RunRecord]:
        if (study, method) not in loaded:
            loaded[study, method] = _finished_runs(folder / study / method)
        return loaded[study, method]

    rows = []
    for claim in claims:
        groups = {name: runs(claim.study, name) for name in (claim.method, claim.baseline)}
        comparison = compare(groups, _CLAIM_METRICS, reference=claim.method) if all(groups.values()) else None
        rows.append(_row(claim, comparison))
    return rows


def claims_markdown(rows: Sequence[ClaimRow]) -> str:
    """The claims table: paper | claim | study | paper's number | ours (paired difference) | verdict."""
    lines = [
        "| paper | claim | study | paper's number | ours: method − baseline by seed [95% CI] p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        claim = row.claim
        cells = (
            claim.paper,
            f"{claim.method} {claim.text} ({claim.baseline}; {_METRIC_LABELS.get(claim.metric, claim.metric)})",
            claim.study,
            claim.paper_number,
            row.ours,
            row.verdict,
        )
        lines.append("| " + " | ".join(fmt.markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_claims(path: str | Path, rows: Sequence[ClaimRow]) -> Path:
    """Replace the part of ``path`` between :data:`BEGIN` and :data:`END` with the claims table (atomically)."""
    target = Path(path)
    if not target.is_file():
        raise FedExpertsError(f"{target} does not exist: --write rewrites the claims part of an existing file")
    text = target.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise FedExpertsError(f"{target} has no claims part: put the lines {BEGIN} and {END} where the table goes")
    updated = text[: start + len(BEGIN)] + "\n\n" + claims_markdown(rows) + "\n" + text[end:]
    with atomic_file(target) as staging:
        staging.write_text(updated, encoding="utf-8")
    return target

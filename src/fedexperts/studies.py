"""Comparison presets: the FLEx and FedMoE papers' settings on ExpertBench, and FLEx's own on Dolly.

Each study is a set of config overrides, the methods compared and the seeds; ``fedexperts compare
--study NAME`` runs it (data and partition fixed by ``data.seed``, methods and seeds varying the
federation seed). The ExpertBench sizes are chosen so that one study finishes in well under an hour
on 2 CPU cores with the built-in model; the papers' own scales are larger.

The ``flex-paper-*`` studies are the FLEx paper's (and its official scripts') settings as they are:
Qwen1.5-MoE-A2.7B on Dolly-15k, for a GPU. ``model.name=...`` and ``data.source=FILE`` (a local
``databricks-dolly-15k.jsonl``) override the model and the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fedexperts.errors import FedExpertsError

_DECIDING_EVAL = (
    "data.items=6000",
    "eval.every=0",
    "eval.max_examples=100",
    "eval.union_examples=40",
    "eval.probes=100",
)
"""Scores that can decide: 6000 ExpertBench items give every client of these studies at least 100 test rows
(the smallest Dirichlet client has 122), each scored on 100, and 100 knowledge probes (log-likelihood, cheap).
The pooled union set stays at 40 rows: generation dominates a run's time on 2 cores, and no claim reads the
union score. Only the final evaluation runs (``eval.every=0``): it is what the comparison reads, and per-round
scoring at this size would double a run's time (``rounds to 90%`` is therefore not measured)."""
DECIDING_SEEDS = (0, 1, 2, 3, 4)
"""Five seeds: the fewest at which a paired t-interval is usable (4 degrees of freedom, t = 2.78); the
signed-rank test still cannot go below p = 0.0625 there, which every comparison states."""
_COMMON = ("federation.rounds=5", "train.steps_per_round=10", *_DECIDING_EVAL)
"""50 local steps per client in all: the built-in model's LoRA and grafted experts move its scores within that
(docs/RESULTS.md), and a 30-run study stays under an hour on 2 cores."""


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    overrides: tuple[str, ...]
    algorithms: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Overrides for one method only (applied after ``overrides``): keys of one algorithm are errors in another."""
    reference: str | None = None
    """The study's proposed method: the comparison reports every other method's paired difference to it."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Category -> score name of a per-task table in FedMoE's layout (:mod:`fedexperts.reporting.paper_layout`)."""
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Named override sets a method can pick: the method ``fedavg@switch-8`` is fedavg with the ``switch-8`` ones
    (applied after the method's own), so one study can run an algorithm on two models."""

    def run_overrides(self, method: str) -> list[str]:
        """The study's overrides of ``method``'s runs: the shared ones, its algorithm's, its variant's, its name."""
        algorithm, variant = split_method(method)
        if variant is not None and variant not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise FedExpertsError(f"method {method!r}: study {self.name!r} has no variant {variant!r} ({known})")
        return [
            *self.overrides,
            *self.method_overrides.get(algorithm, ()),
            *self.variants.get(variant or "", ()),
            f"algorithm.name={algorithm}",
        ]


def split_method(method: str) -> tuple[str, str | None]:
    """``"fedavg@switch-8"`` -> ``("fedavg", "switch-8")``; a plain algorithm name has no variant."""
    algorithm, at, variant = method.partition("@")
    return algorithm, (variant if at else None)


_FLEX_METHODS = ("local", "fedavg", "fedprox", "dense", "random-expert", "fedsa-lora", "ffa-lora", "feddpa", "flex")
"""FLEx's baselines, the LoRA-FL methods reviewers ask for (FedSA-LoRA, FFA-LoRA, FedDPA), and FLEx."""
_FLEX_PER_METHOD: dict[str, tuple[str, ...]] = {"random-expert": ("algorithm.personal=true",)}
"""FLEx's random-experts baseline: a random pretrained expert grafted per layer and kept personal, as FLEx's
official code runs it (the expert adapters are never averaged)."""

_PAPER_CATEGORIES = '["closed_qa", "information_extraction", "classification", "summarization"]'
_FLEX_PAPER = (
    'model.name="Qwen/Qwen1.5-MoE-A2.7B"',
    "model.dtype=bfloat16",
    'data.source="databricks/databricks-dolly-15k"',
    f"data.categories={_PAPER_CATEGORIES}",
    "data.test_per_category=100",
    "data.max_length=512",
    "federation.rounds=100",
    "train.steps_per_round=5",
    "train.batch_size=4",
    "train.learning_rate=4e-5",
    "train.min_learning_rate=1e-6",
    "train.router_aux_loss_coef=0.001",
    "eval.every=0",
    "eval.max_new_tokens=256",
    "eval.max_examples=400",
    "eval.union_examples=400",
    "eval.probes=0",
    "algorithm.lora.rank=32",
    "algorithm.lora.alpha=64",
    "algorithm.lora.dropout=0.05",
    'algorithm.lora.targets=["q_proj", "k_proj", "v_proj"]',
)
"""FLEx's official scripts: every key here is valid for each of :data:`_FLEX_PAPER_METHODS`."""
_FLEX_PAPER_METHODS = ("local", "fedavg", "fedprox", "random-expert", "flex")
"""What the FLEx paper compares that fedexperts has (not its FedAdagrad/FedAdam/FedYogi/SCAFFOLD rows:
the first three are ``algorithm.server.rule`` of fedavg, SCAFFOLD is not implemented)."""

FEDMOE_TASKS = {"classification": "accuracy", "closed_qa": "token_f1", "summarization": "rouge_2"}
"""FedMoE's three task types on ExpertBench and the score the paper reports for each: AG News (a label task) ->
classification, label accuracy; SQuAD (extractive QA) -> closed_qa (the answer is a span of the context), token
F1; XSum (summarization) -> summarization, ROUGE-2."""
_FEDMOE_PAPER = (
    "federation.clients=30",
    f"data.categories={json.dumps(list(FEDMOE_TASKS))}",
    "data.scheme=pathological",
    "data.classes_per_client=1",
    "data.items=6000",
    "federation.rounds=12",
    "train.steps_per_round=10",
    "eval.every=0",
    "eval.max_examples=24",
    "eval.union_examples=0",
    "eval.probes=0",
)
"""30 clients of one task type each (10 per type, as the paper's three datasets); 6000 ExpertBench items keep
3600 rows of the three types, 120 per client, 24 of them its test rows (all scored). 12 rounds of 10 steps: with 5
of 30 clients a round each client trains in about 2 of them (20 steps), and FedMoE's stage 1 (2 warm-up rounds,
then the measuring one) leaves 9 rounds of stage 2. No union set or knowledge probes: no FedMoE claim reads them,
and scoring 30 clients on them would double a run's time."""
_FEDMOE_PAPER_METHOD: dict[str, tuple[str, ...]] = {
    name: (
        "algorithm.fedmoe.budget_fraction=0.7",
        "algorithm.fedmoe.full_budget_every=2",
        "algorithm.fedmoe.warmup_rounds=2",
        "algorithm.fedmoe.wait_for_stage_1=false",
        "federation.client_model=sub-moe",
    )
    for name in ("fedmoe", "random-moe")
}
"""Half the clients can hold the full model and profile, the rest 0.7 of its bytes (the built-in Switch-32's
dense part is 49% of it, so about 40% of its experts), each holding only its sub-MoE
(``client_model = "sub-moe"``, so its ``model_bytes`` is what a device holds). ``wait_for_stage_1 = false``: with 5
of 30 clients a round, a budget client sampled before its category was measured would otherwise sit whole rounds
out; it trains a provisional sub-MoE instead (the paper does not say which it does)."""
_FEDMOE_PAPER_VARIANTS: dict[str, tuple[str, ...]] = {
    "switch-8": ('model.name="builtin:switch-8"',),
    "switch-32": ('model.name="builtin:switch-32"',),
}
_FEDMOE_PAPER_METHODS = (
    "dense@switch-8",
    "dense@switch-32",
    "fedavg@switch-32",
    "random-moe@switch-32",
    "fedmoe@switch-32",
)
"""As the paper: its FedAvg baseline fine-tunes the whole Switch-8 (``dense``: every weight trained and averaged),
FedMoE and its randomMoE ablation run on Switch-32; plus ``dense`` on Switch-32, so every method is also compared
on FedMoE's own model, and FedAvg of attention LoRA on it (the sparsity-blind PEFT baseline)."""

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "flex-pathological",
            "FLEx's pathological split: each of 5 clients holds one task category, in its own answer style",
            (*_COMMON, "federation.clients=5", "data.scheme=pathological", "data.classes_per_client=1"),
            _FLEX_METHODS,
            seeds=DECIDING_SEEDS,
            method_overrides=_FLEX_PER_METHOD,
            reference="flex",
        ),
        Study(
            "flex-dirichlet-0.5",
            "FLEx's Dirichlet split over categories, alpha 0.5 (skewed), 5 clients",
            (*_COMMON, "federation.clients=5", "data.scheme=dirichlet", "data.alpha=0.5"),
            _FLEX_METHODS,
            seeds=DECIDING_SEEDS,
            method_overrides=_FLEX_PER_METHOD,
            reference="flex",
        ),
        Study(
            "flex-dirichlet-1.0",
            "FLEx's Dirichlet split over categories, alpha 1.0 (milder), 5 clients",
            (*_COMMON, "federation.clients=5", "data.scheme=dirichlet", "data.alpha=1.0"),
            _FLEX_METHODS,
            seeds=DECIDING_SEEDS,
            method_overrides=_FLEX_PER_METHOD,
            reference="flex",
        ),
        Study(
            "flex-paper-pathological",
            "FLEx paper: Qwen1.5-MoE-A2.7B on Dolly-15k, 4 clients each holding one of closed_qa, "
            "information_extraction, classification, summarization (100 test rows each), 100 rounds (GPU)",
            (*_FLEX_PAPER, "federation.clients=4", "data.scheme=pathological", "data.classes_per_client=1"),
            _FLEX_PAPER_METHODS,
            seeds=(0,),
            method_overrides=_FLEX_PER_METHOD,
            reference="flex",
        ),
        *(
            Study(
                name,
                f"FLEx paper: Qwen1.5-MoE-A2.7B on Dolly-15k's four categories, 10 clients of 1000 rows drawn with "
                f"replacement by Dirichlet alpha {alpha}, 100 test rows per category, 100 rounds (GPU)",
                (
                    *_FLEX_PAPER,
                    "federation.clients=10",
                    "data.scheme=dirichlet",
                    f"data.alpha={alpha}",
                    "data.rows_per_client=1000",
                ),
                _FLEX_PAPER_METHODS,
                seeds=(0,),
                method_overrides=_FLEX_PER_METHOD,
                reference="flex",
            )
            for name, alpha in (("flex-paper-dirichlet", "0.5"), ("flex-paper-dirichlet-1.0", "1.0"))
        ),
        Study(
            "fedmoe-experts32",
            "FedMoE's setting where the sub-MoE matters: the 32-expert built-in model, 10 clients of one category "
            "each, half of them with a 0.4 memory budget, 5 sampled per round, 12 rounds (2 of warm-up)",
            (
                'model.name="builtin:experts32"',
                "federation.clients=10",
                *_DECIDING_EVAL,
                "data.scheme=pathological",
                "data.classes_per_client=1",
                "federation.fraction=0.5",
                "federation.rounds=12",
                "train.steps_per_round=5",
                "algorithm.fedmoe.budget_fraction=0.4",
                "algorithm.fedmoe.full_budget_every=2",
                "algorithm.fedmoe.warmup_rounds=2",
            ),
            ("random-moe", "fedmoe"),
            seeds=DECIDING_SEEDS,
            reference="fedmoe",
        ),
        Study(
            "fedmoe-paper",
            "FedMoE's setting: 30 clients, each of one task type (label task, extractive QA, summarization), "
            "5 sampled at random per round; full FedAvg on the built-in Switch-8, FedMoE and randomMoE on Switch-32",
            (*_FEDMOE_PAPER, f"federation.fraction={5 / 30!r}"),
            _FEDMOE_PAPER_METHODS,
            method_overrides=_FEDMOE_PAPER_METHOD,
            reference="fedmoe@switch-32",
            tasks=FEDMOE_TASKS,
            variants=_FEDMOE_PAPER_VARIANTS,
        ),
        Study(
            "fedmoe-paper-distinct",
            "FedMoE's setting with 3 clients per round, each of a different task type (the paper's cross-task rounds)",
            (*_FEDMOE_PAPER, "federation.fraction=0.1", "federation.sampling=distinct"),
            _FEDMOE_PAPER_METHODS,
            method_overrides=_FEDMOE_PAPER_METHOD,
            reference="fedmoe@switch-32",
            tasks=FEDMOE_TASKS,
            variants=_FEDMOE_PAPER_VARIANTS,
        ),
    )
}


def study(name: str) -> Study:
    if name not in STUDIES:
        raise FedExpertsError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]

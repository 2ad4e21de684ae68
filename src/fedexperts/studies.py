"""Comparison presets that reproduce the FLEx and FedMoE papers' settings on ExpertBench.

Each study is a set of config overrides, the methods compared and the seeds; ``fedexperts compare
--study NAME`` runs it (data and partition fixed by ``data.seed``, methods and seeds varying the
federation seed). Sizes are chosen so that one study finishes in well under an hour on 2 CPU
cores with the built-in model; the papers' own scales are larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedexperts.errors import FedExpertsError

_COMMON = (
    "federation.rounds=5",
    "train.steps_per_round=10",
    "eval.max_examples=24",
    "eval.union_examples=40",
    "eval.probes=48",
)


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    overrides: tuple[str, ...]
    algorithms: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)


_FLEX_METHODS = ("local", "fedavg", "fedprox", "dense", "flex")
_FEDMOE_METHODS = ("local", "fedavg", "dense", "flex", "random-moe", "fedmoe")

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "flex-pathological",
            "FLEx's pathological split: each of 5 clients holds one task category, in its own answer style",
            (*_COMMON, "federation.clients=5", "data.scheme=pathological", "data.classes_per_client=1"),
            _FLEX_METHODS,
        ),
        Study(
            "flex-dirichlet-0.5",
            "FLEx's Dirichlet split over categories, alpha 0.5 (skewed), 5 clients",
            (*_COMMON, "federation.clients=5", "data.scheme=dirichlet", "data.alpha=0.5"),
            _FLEX_METHODS,
        ),
        Study(
            "flex-dirichlet-1.0",
            "FLEx's Dirichlet split over categories, alpha 1.0 (milder), 5 clients",
            (*_COMMON, "federation.clients=5", "data.scheme=dirichlet", "data.alpha=1.0"),
            _FLEX_METHODS,
        ),
        Study(
            "fedmoe-random",
            "FedMoE's heterogeneous tasks: 10 clients, one category each, 5 sampled per round at random",
            (
                *_COMMON,
                "federation.clients=10",
                "data.items=2000",
                "data.scheme=pathological",
                "data.classes_per_client=1",
                "federation.fraction=0.5",
                "federation.sampling=random",
            ),
            _FEDMOE_METHODS,
        ),
        Study(
            "fedmoe-distinct",
            "FedMoE's heterogeneous tasks with enforced-different sampling: the 5 sampled clients differ in category",
            (
                *_COMMON,
                "federation.clients=10",
                "data.items=2000",
                "data.scheme=pathological",
                "data.classes_per_client=1",
                "federation.fraction=0.5",
                "federation.sampling=distinct",
            ),
            _FEDMOE_METHODS,
        ),
    )
}


def study(name: str) -> Study:
    if name not in STUDIES:
        raise FedExpertsError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]

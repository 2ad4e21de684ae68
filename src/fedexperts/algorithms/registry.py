"""Every algorithm, listed once: name -> config model -> constructor.

Torch-free: the configs are imported here and the constructors only when an algorithm is built,
so validating an experiment (and reporting a key of the wrong algorithm) does not load torch.
Adding an algorithm is its own package (``config.py`` with a subclass of
:class:`~fedexperts.algorithms.settings.AlgorithmSettings`, and its code) plus one line in
:data:`CONFIGS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field, TypeAdapter

from fedexperts.algorithms.fedavg.config import DenseConfig, FedAvgConfig, FedProxConfig
from fedexperts.algorithms.feddpa.config import FedDPAConfig
from fedexperts.algorithms.fedmoe.config import FedMoEConfig, RandomMoEConfig
from fedexperts.algorithms.fedsa_lora.config import FedSALoRAConfig
from fedexperts.algorithms.ffa_lora.config import FFALoRAConfig
from fedexperts.algorithms.flex.config import FlexConfig
from fedexperts.algorithms.local.config import LocalConfig
from fedexperts.algorithms.random_expert.config import RandomExpertConfig
from fedexperts.algorithms.settings import AlgorithmSettings, dotted_keys

if TYPE_CHECKING:
    from fedexperts.interface import Algorithm

CONFIGS: tuple[type[AlgorithmSettings], ...] = (
    LocalConfig,
    FedAvgConfig,
    FedProxConfig,
    DenseConfig,
    FlexConfig,
    RandomExpertConfig,
    FedMoEConfig,
    RandomMoEConfig,
    FedSALoRAConfig,
    FFALoRAConfig,
    FedDPAConfig,
)

DEFAULT_ALGORITHM = "flex"

if TYPE_CHECKING:
    AlgorithmConfig = AlgorithmSettings
else:
    AlgorithmConfig = Annotated[Union[CONFIGS], Field(discriminator="name")]  # noqa: UP007
"""``ExperimentConfig.algorithm``: one of :data:`CONFIGS`, chosen by its ``name``."""


def parse_algorithm(data: Any) -> AlgorithmSettings:
    """Validate one algorithm section (a mapping with its ``name``) into that algorithm's config."""
    config: AlgorithmSettings = TypeAdapter(AlgorithmConfig).validate_python(data)
    return config


def config_class(name: str) -> type[AlgorithmSettings]:
    for config in CONFIGS:
        if config.model_fields["name"].default == name:
            return config
    raise KeyError(name)


def algorithm_names() -> list[str]:
    return [str(config.model_fields["name"].default) for config in CONFIGS]


def owners(key: str) -> list[str]:
    """The algorithms whose config has ``key`` (dotted, below ``algorithm.``) or a section named by it."""
    found = []
    for config in CONFIGS:
        keys = dotted_keys(config)
        if any(each == key or each.startswith(f"{key}.") for each in keys):
            found.append(str(config.model_fields["name"].default))
    return found


def build_algorithm(config: AlgorithmSettings, *, client_ids: Sequence[str] | None = None, seed: int = 0) -> Algorithm:
    """The algorithm ``config`` describes; ``client_ids`` (the federation's clients, in order) give
    per-client settings their owners (FedMoE's budgets); without them (``fedexperts plan``) none.
    ``seed`` is the federation's (``federation.seed``), for algorithms that draw at random (randomMoE)."""
    module, _, attribute = type(config).builder.partition(":")
    constructor: Any = getattr(importlib.import_module(module), attribute)
    algorithm: Algorithm = constructor(config, client_ids=client_ids, seed=seed)
    return algorithm

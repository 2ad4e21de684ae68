"""The experiment config as a Flower run config, and back.

Flower run configs are flat ``dotted.key -> bool | int | float | str`` maps (nested TOML tables
are flattened by Flower itself), and ``--run-config`` may only override keys the app declares.
So the app declares every key of the resolved experiment config: ``None`` travels as the empty
string and a list (of integers, or of names such as LoRA targets) as a comma-separated string;
:func:`config_from_run_config` undoes both and validates the result like any other config .
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedexperts.config import ConfigError, ExperimentConfig, build_config, list_valued_keys

NONE = ""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_run_config(config: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """Every key of ``config`` with a Flower-compatible value (``output_dir`` made absolute)."""
    data = config.model_dump(mode="json")
    data["output_dir"] = str(config.output_dir.expanduser().resolve())
    flat: dict[str, bool | int | float | str] = {}
    for key, value in _flatten(data).items():
        if value is None:
            flat[key] = NONE
        elif isinstance(value, list):
            flat[key] = ",".join(str(item) for item in value)
        else:
            flat[key] = value
    return flat


def nested_run_config(config: ExperimentConfig) -> dict[str, Any]:
    """:func:`config_to_run_config` as nested tables (what a pyproject's ``[tool.flwr.app.config]`` holds)."""
    nested: dict[str, Any] = {}
    for key, value in config_to_run_config(config).items():
        *parents, leaf = key.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return nested


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config a Flower run config describes (keys outside the config are an error)."""
    nested: dict[str, Any] = {}
    list_keys = list_valued_keys()
    for key, value in run_config.items():
        if value == NONE:
            value = None
        elif key in list_keys and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
            if list_keys[key] is int:
                try:
                    value = [int(item) for item in value]
                except ValueError:
                    raise ConfigError(f"{key}: expected comma-separated integers, got {run_config[key]!r}") from None
        *parents, leaf = key.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return build_config(nested)

"""The experiment config as a Flower run config, and back.

Flower run configs are flat ``dotted.key -> bool | int | float | str`` maps (nested TOML tables
are flattened by Flower itself), and ``--run-config`` may only override keys the app declares.
So the app declares every key of the resolved experiment config: ``None`` travels as the empty
string and a list (of integers, or of names such as LoRA targets) as a comma-separated string;
:func:`config_from_run_config` undoes both and validates the result like any other config. Two
keys outside the experiment config say what the ServerApp does with a run already in the run
directory (:data:`RUN_CONTROL`): ``resume`` continues it, ``overwrite`` deletes it first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedexperts.config import ConfigError, ExperimentConfig, build_config, list_valued_keys

NONE = ""
RUN_CONTROL: dict[str, bool] = {"resume": False, "overwrite": False}
"""Run-config keys that are not experiment settings, with their defaults (declared by every app)."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_run_config(config: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """Every key of ``config`` as a Flower value (``output_dir`` made absolute), and :data:`RUN_CONTROL`."""
    data = config.model_dump(mode="json")
    data["output_dir"] = str(config.output_dir.expanduser().resolve())
    flat: dict[str, bool | int | float | str] = dict(RUN_CONTROL)
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
        if key in RUN_CONTROL:
            continue
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


def run_control(run_config: Mapping[str, Any]) -> dict[str, bool]:
    """The :data:`RUN_CONTROL` keys of a run config, each checked to be a boolean."""
    control = dict(RUN_CONTROL)
    for key in RUN_CONTROL:
        value = run_config.get(key, RUN_CONTROL[key])
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"run config {key}={value!r}: expected true or false")
        control[key] = value
    if control["resume"] and control["overwrite"]:
        raise ConfigError("run config: resume=true continues the run and overwrite=true deletes it: choose one")
    return control

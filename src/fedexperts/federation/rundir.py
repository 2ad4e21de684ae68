"""The run directory both runtimes write: the resolved config beside the run, never clobbered silently."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedexperts.atomic import atomic_file
from fedexperts.config import ExperimentConfig, build_config
from fedexperts.federation.server import RunError
from fedexperts.reporting.schema import CONFIG_FILE


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    """The lines of ``metrics.jsonl``."""


def _config_toml(config: ExperimentConfig) -> str:
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def _check_same_config(run_dir: Path, config: ExperimentConfig) -> None:
    import tomllib

    saved = build_config(tomllib.loads((run_dir / CONFIG_FILE).read_text()))
    mine, theirs = config.model_dump(mode="json"), saved.model_dump(mode="json")
    differing = sorted(_differences(mine, theirs))
    if differing:
        raise RunError(
            f"{run_dir} holds a run of a different config (differs in {', '.join(differing)}); "
            "resume with the same config, or choose another run directory"
        )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found.extend(_differences(left, right, f"{prefix}{key}."))
        elif left != right and key != "output_dir":
            found.append(f"{prefix}{key}")
    return found


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Create ``run_dir`` with the resolved config, or check it for ``resume``; never clobber a run silently."""
    exists = (run_dir / CONFIG_FILE).exists()
    if exists and overwrite:
        shutil.rmtree(run_dir)
        exists = False
    if resume and not exists:
        raise RunError(f"nothing to resume: {run_dir} holds no run (no {CONFIG_FILE})")
    if exists and not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    if exists:
        _check_same_config(run_dir, config)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / CONFIG_FILE) as path:
        path.write_text(_config_toml(config))

"""A Flower app folder for ``flwr run``: a pyproject naming fedexperts' ServerApp and ClientApp.

The app holds no code of its own (its components are the installed ``fedexperts`` modules, which
every SuperLink and SuperNode machine must have installed), only the experiment config as the
app's run config, so ``flwr run APP CONNECTION --run-config "federation.rounds=5"`` overrides any
key without editing files. Flower rewrites a pyproject that declares federations, so none is
declared: connections live in ``$FLWR_HOME/config.toml``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from fedexperts.atomic import atomic_file
from fedexperts.config import ExperimentConfig
from fedexperts.errors import FedExpertsError
from fedexperts.federation.flower.runconfig import nested_run_config

PUBLISHER = "fedexperts"
SERVER_APP = "fedexperts.federation.flower.serverapp:app"
CLIENT_APP = "fedexperts.federation.flower.clientapp:app"


def _check_target(folder: Path) -> None:
    """``folder`` may be new, or hold a Flower app this wrote earlier (rewritten); never a file, nor another project."""
    if folder.exists() and not folder.is_dir():
        raise FedExpertsError(f"{folder}: is a file; expected a folder for the Flower app (created if missing)")
    existing = folder / "pyproject.toml"
    if not existing.exists():
        return
    try:
        publisher = tomllib.loads(existing.read_text())["tool"]["flwr"]["app"]["publisher"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        publisher = None
    if publisher != PUBLISHER:
        raise FedExpertsError(
            f"{folder}: holds a pyproject.toml that is not a fedexperts Flower app; it is left as it is: "
            "choose a new folder"
        )


def write_app(config: ExperimentConfig, folder: Path) -> Path:
    """Write ``folder/pyproject.toml`` and return its path; a pyproject.toml that is not ours is refused."""
    _check_target(folder)
    name = "".join(char if char.isalnum() else "-" for char in config.name.lower()).strip("-") or "run"
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": f"fedexperts-{name}",
            "version": "1.0.0",
            "description": f"fedexperts experiment {config.name!r} as a Flower app",
            "license": "Apache-2.0",
            "dependencies": ["fedexperts[flower]"],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": nested_run_config(config),
                }
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "pyproject.toml") as path:
        path.write_text(tomli_w.dumps(pyproject))
    return folder / "pyproject.toml"

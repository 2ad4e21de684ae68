"""Run directories: folders fedexperts made and marked, which hold runs and nothing else.

* A new run goes into a folder that does not exist or is empty; fedexperts marks it with the
  manifest (:mod:`fedexperts.runfiles`) and writes the resolved ``config.toml``.
* A run directory (one with the manifest) is continued only with ``resume`` (same config) and
  replaced only with ``overwrite``, which deletes only what fedexperts wrote there and refuses,
  deleting nothing, when the folder holds anything else: a file it did not write, one changed
  since, a folder or link of someone else's. ``resume`` and ``overwrite`` together are refused.
* A run that never completed a round holds no results: a new start replaces it (with the same
  care), and a start that fails removes it (:func:`discard_unstarted`), so a start that failed
  never blocks the corrected one.

Besides the listed files, fedexperts owns, by name, its atomic-write temporaries, the clients'
staged states and a Flower simulation's node states (written by other processes, never listed).
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedexperts.atomic import TEMPORARY, atomic_file
from fedexperts.config import ExperimentConfig, build_config
from fedexperts.errors import FedExpertsError, RunError
from fedexperts.federation.runstore import AUDIT, CHECKPOINTS, CLIENTS, NODES, RECORDS
from fedexperts.federation.state import STAGING
from fedexperts.reporting.schema import CONFIG_FILE
from fedexperts.runfiles import MANIFEST, RunManifest, mismatch

_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_STAGED = rf"{re.escape(STAGING)}/round-\d{{6}}"
_NODE = rf"{NODES}/run-\d+/partition-\d+"
_OWNED_FILE = re.compile(rf"^(?:{CLIENTS}/{_STAGED}|{_NODE}(?:/{_STAGED})?)/{_ID}\.safetensors$")
_OWNED_FOLDER = re.compile(
    rf"^(?:{RECORDS}|{CHECKPOINTS}|{AUDIT}(?:/round-\d{{6}})?|{CLIENTS}(?:/{re.escape(STAGING)}(?:/round-\d{{6}})?)?"
    rf"|{NODES}(?:/run-\d+(?:/partition-\d+(?:/{re.escape(STAGING)}(?:/round-\d{{6}})?)?)?)?)$"
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    """The lines of ``metrics.jsonl``."""


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a run directory fedexperts made (it holds the manifest)."""
    return (folder / MANIFEST).is_file()


def _config_toml(config: ExperimentConfig) -> str:
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def _check_same_config(run_dir: Path, config: ExperimentConfig) -> None:
    path = run_dir / CONFIG_FILE
    try:
        saved = build_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, FedExpertsError) as error:
        raise RunError(f"cannot resume {run_dir}: {path} is not a readable TOML config ({error})") from None
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


def _survey(manifest: RunManifest) -> tuple[list[Path], list[Path], list[str]]:
    """The run directory's files and folders fedexperts may delete, and why each other entry may not be."""
    files: list[Path] = []
    folders: set[Path] = set()
    refused: list[str] = []
    listed = {Path(name).parent.as_posix() for name in (*manifest.files, *manifest.pending)}
    for here, dirs, names in os.walk(manifest.folder):
        for name in sorted(dirs):
            path = Path(here) / name
            relative = manifest.name(path)
            if path.is_symlink():
                refused.append(f"{relative}, a link fedexperts did not make")
            elif _OWNED_FOLDER.match(relative) or any(
                known == relative or known.startswith(f"{relative}/") for known in listed
            ):
                folders.add(path)
            else:
                refused.append(f"{relative}/, a folder fedexperts did not make")
        dirs[:] = [name for name in dirs if Path(here, name) in folders]
        for name in sorted(names):
            path = Path(here) / name
            relative = manifest.name(path)
            entry = manifest.files.get(relative)
            if path.is_symlink():
                refused.append(f"{relative}, a link fedexperts did not make")
            elif entry is not None and relative not in manifest.pending:
                problem = mismatch(path, entry)
                if problem is None:
                    files.append(path)
                else:
                    refused.append(f"{relative}, which {problem}")
            elif manifest.owns(relative) or _OWNED_FILE.match(relative) or TEMPORARY.match(name):
                files.append(path)
            else:
                refused.append(f"{relative}, which fedexperts did not write")
    return files, sorted(folders), refused


def remove_run(manifest: RunManifest, *, why: str) -> None:
    """Delete what fedexperts wrote in a run directory, or refuse (``why`` it was asked) and delete nothing."""
    files, folders, refused = _survey(manifest)
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise RunError(
            f"{manifest.folder}: {why} would delete only what fedexperts wrote, but it holds {refused[0]}{more}; "
            "move those out, or choose another run directory"
        )
    for path in sorted(files, key=lambda path: path.name == MANIFEST):  # the manifest last
        path.unlink(missing_ok=True)
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        _remove_empty(folder)
    if manifest.created_folder:
        _remove_empty(manifest.folder)


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (something appeared meanwhile): keep it
        folder.rmdir()


def _unstarted(manifest: RunManifest) -> bool:
    return manifest.rounds_done == 0 and f"{RECORDS}/final.json" not in manifest.files


def discard_unstarted(run_dir: Path) -> None:
    """After a failed start: remove the run if it never completed a round (nothing of another's is touched)."""
    try:
        manifest = RunManifest.load(run_dir)
        if manifest is not None and _unstarted(manifest):
            remove_run(manifest, why="cleaning up the failed start")
    except FedExpertsError:  # something else is in the folder: leave it all, the next start says why
        pass


def _create(config: ExperimentConfig, run_dir: Path) -> None:
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(run_dir, created_folder=created)
    path = run_dir / CONFIG_FILE
    with manifest.writing(path), atomic_file(path) as staging:
        staging.write_text(_config_toml(config), encoding="utf-8")


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Make ``run_dir`` a new run directory of ``config``, or check it for ``resume`` (see the module docstring)."""
    if resume and overwrite:
        raise RunError("--resume continues the run in the run directory and --overwrite deletes it: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run directory")
    manifest = RunManifest.load(run_dir)
    if manifest is None:
        if resume:
            older = " (a config.toml without one: a run of an older fedexperts, which cannot be verified)"
            raise RunError(
                f"nothing to resume: {run_dir} holds no fedexperts run (no {MANIFEST})"
                + (older if (run_dir / CONFIG_FILE).exists() else "")
            )
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunError(
                f"{run_dir} is not empty and holds no fedexperts run (no {MANIFEST}); a run needs a new or empty "
                f"folder{' (--overwrite deletes only runs fedexperts made)' if overwrite else ''}: "
                "choose another run directory"
            )
        _create(config, run_dir)
    elif resume:
        _check_same_config(run_dir, config)
    elif overwrite or _unstarted(manifest):
        remove_run(manifest, why="--overwrite" if overwrite else "starting over a run that completed no round")
        _create(config, run_dir)
    else:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")

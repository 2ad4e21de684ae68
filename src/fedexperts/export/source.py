"""What an export reads of a run directory, checked before torch loads: the run, its config, its clients.

Torch-free, so ``fedexperts export`` reports a wrong folder, an unfinished run, an unknown client or
an occupied ``--out`` in about a second.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedexperts.config import ExperimentConfig, build_config
from fedexperts.errors import FedExpertsError
from fedexperts.reporting.runs import RunRecord, load_run
from fedexperts.reporting.schema import CONFIG_FILE
from fedexperts.runfiles import MANIFEST, RunManifest


@dataclass(frozen=True)
class RunSource:
    """A run directory with at least one committed round: what an export starts from."""

    run_dir: Path
    config: ExperimentConfig
    manifest: RunManifest
    record: RunRecord
    """``metrics.jsonl`` (the run, its rounds, the final evaluation if written) and the config's text."""

    @property
    def rounds_done(self) -> int:
        """The last committed round: its checkpoint holds the global state the export starts from."""
        return self.manifest.rounds_done

    @property
    def finished(self) -> bool:
        """Every round of the config ran: the client models are those of the run's final evaluation."""
        return self.rounds_done >= self.config.federation.rounds

    @property
    def step_round(self) -> int:
        """The round whose client step builds the exported model (``rounds + 1``: the final evaluation)."""
        return self.rounds_done + 1

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(self.record.info.clients)

    def client_index(self, client_id: str) -> int:
        """The client's position in the federation, or a one-line error naming the run's clients."""
        if client_id not in self.clients:
            first, last = self.clients[0], self.clients[-1]
            raise FedExpertsError(
                f"--client {client_id!r} is not a client of {self.run_dir}; its clients are {first} ... {last}"
            )
        return self.clients.index(client_id)


def open_run(run_dir: str | Path) -> RunSource:
    """The run in ``run_dir``, refused (one line) unless fedexperts made it and it committed a round."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FedExpertsError(f"{folder}: no such run directory")
    manifest = RunManifest.load(folder)
    if manifest is None:
        raise FedExpertsError(f"{folder} is not a fedexperts run directory (no {MANIFEST})")
    if manifest.rounds_done < 1:
        raise FedExpertsError(f"{folder} has no finished round: nothing to export yet")
    path = folder / CONFIG_FILE
    try:
        config = build_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise FedExpertsError(f"{path}: cannot read the run's config ({error})") from None
    return RunSource(folder, config, manifest, load_run(folder))


def check_out(out: str | Path) -> Path:
    """``--out``: a folder to create, or an empty one (an export never writes among other files)."""
    folder = Path(out)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FedExpertsError(f"--out {folder} is not a folder; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise FedExpertsError(f"--out {folder} is not empty; an export writes a new folder: give a new or empty one")
    return folder

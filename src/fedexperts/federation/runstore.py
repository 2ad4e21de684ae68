"""The server's files in a run directory, and the order that makes a round durable.

A round ``r`` is written in this order: its record and checkpoint are marked pending in the run's
manifest (:mod:`fedexperts.runfiles`) and written; then one manifest save lists them with the
clients' staged personal states (under the names they will have) and sets ``rounds_done = r``:
that save is the round's commit point. Only then do the staged states move into place and the
checkpoints older than the last ``keep`` go. A run killed before the commit point redoes round
``r``; killed after it, it finishes the moves (their digests are already listed) and goes on.

With ``federation.audit`` the round's audit files (every accepted update and the new global state,
under ``audit/round-NNNNNN/``) are written and listed with its record and checkpoint, so they are
committed, rolled back and deleted with the round, and are never retired.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedexperts.atomic import atomic_file
from fedexperts.errors import RunError
from fedexperts.federation.state import CheckpointStore, write_payload
from fedexperts.interface import Payload
from fedexperts.reporting import schema
from fedexperts.runfiles import MANIFEST, FileEntry, RunManifest, describe

RECORDS, CHECKPOINTS, CLIENTS, NODES, AUDIT = "records", "checkpoints", "clients", "nodes", "audit"
"""The run directory's folders of round records, server checkpoints, client states (in-process), the
node states of a Flower simulation and the audit of accepted updates."""
_LISTED_CHECKPOINT = re.compile(rf"^{CHECKPOINTS}/round-(\d{{6}})\.safetensors$")
_LISTED_RECORD = re.compile(rf"^{RECORDS}/round-(\d{{6}})\.json$")
_LISTED_AUDIT = re.compile(rf"^{AUDIT}/round-(\d{{6}})/[^/]+\.safetensors$")

Record = schema.RunInfo | schema.RoundRecord | schema.FinalRecord


class RunStore:
    """Records, metrics and checkpoints of one prepared run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, *, keep_checkpoints: int = 2) -> None:
        manifest = RunManifest.load(run_dir)
        if manifest is None:
            raise RunError(f"{run_dir} is not a prepared run directory (no {MANIFEST}); see prepare_run_dir")
        self.run_dir = run_dir
        self.manifest = manifest
        self.checkpoints = CheckpointStore(run_dir / CHECKPOINTS)
        self.keep = keep_checkpoints

    @property
    def rounds_done(self) -> int:
        return self.manifest.rounds_done

    # -- records ---------------------------------------------------------------------------------------
    def record_path(self, name: str) -> Path:
        return self.run_dir / RECORDS / f"{name}.json"

    def has_record(self, name: str) -> bool:
        return self.manifest.entry(self.record_path(name)) is not None

    def _write_json(self, path: Path, record: Record) -> None:
        with atomic_file(path) as staging:
            staging.write_text(json.dumps(schema.dump(record), allow_nan=False))

    def write_record(self, name: str, record: Record) -> None:
        path = self.record_path(name)
        with self.manifest.writing(path):
            self._write_json(path, record)

    def records(self) -> list[dict[str, Any]]:
        """The run record, every committed round's record, and the final record once written."""
        names = ["run", *(f"round-{r:06d}" for r in range(1, self.rounds_done + 1))]
        names += ["final"] if self.has_record("final") else []
        return [json.loads(self.record_path(name).read_text()) for name in names]

    def write_metrics(self) -> list[dict[str, Any]]:
        lines = self.records()
        path = self.run_dir / schema.METRICS_FILE
        with self.manifest.writing(path), atomic_file(path) as staging:
            staging.write_text("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
        return lines

    # -- rounds ----------------------------------------------------------------------------------------
    def checkpoint_rounds(self) -> list[int]:
        """The rounds whose checkpoint the manifest lists, oldest first."""
        found = (_LISTED_CHECKPOINT.match(name) for name in self.manifest.files)
        return sorted(int(match.group(1)) for match in found if match)

    def audit_path(self, round_number: int, name: str) -> Path:
        """Where the audit of ``round_number`` keeps ``name`` (a client id, or ``global``)."""
        return self.run_dir / AUDIT / f"round-{round_number:06d}" / f"{name}.safetensors"

    def commit_round(
        self,
        round_number: int,
        record: schema.RoundRecord,
        checkpoint: Payload,
        staged: Mapping[Path, Path],
        audit: Mapping[str, Payload] | None = None,
    ) -> list[Path]:
        """Write the round's record, checkpoint and audit files and commit the round; return checkpoints to delete.

        ``staged`` maps each client state the transport will put in place to where it is staged now;
        ``audit`` names each audit file of the round (:meth:`audit_path`) and what it holds.
        """
        record_path, checkpoint_path = (
            self.record_path(f"round-{round_number:06d}"),
            self.checkpoints.path(round_number),
        )
        audited = {self.audit_path(round_number, name): payload for name, payload in (audit or {}).items()}
        self.manifest.begin([record_path, checkpoint_path, *audited])
        self._write_json(record_path, record)
        self.checkpoints.save(round_number, checkpoint)
        for path, payload in audited.items():
            write_payload(path, payload)
        written: dict[Path, FileEntry] = {
            record_path: describe(record_path),
            checkpoint_path: describe(checkpoint_path),
            **{path: describe(path) for path in audited},
        }
        written.update({final: describe(now, round_number=round_number) for final, now in staged.items()})
        kept = sorted({*self.checkpoint_rounds(), round_number})
        retired = [self.checkpoints.path(old) for old in kept[: -self.keep]]
        self.manifest.finish(written, retire=retired, rounds_done=round_number)
        return retired

    def delete(self, paths: Iterable[Path]) -> None:
        """Delete fedexperts' own files (retired or pending) and forget them; an emptied audit round's folder too."""
        chosen = list(paths)
        for path in chosen:
            path.unlink(missing_ok=True)
            folder = path.parent
            if folder.parent == self.run_dir / AUDIT and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.manifest.forget(chosen)

    def drop_pending(self) -> None:
        """Delete what an interrupted write left half-way (a round's record and checkpoint, a retired checkpoint)."""
        self.delete([self.run_dir / name for name in sorted(self.manifest.pending)])

    def roll_back(self, round_number: int) -> None:
        """Forget every round after ``round_number`` and the final record, deleting their files."""
        later = []
        for name in self.manifest.files:
            match = _LISTED_CHECKPOINT.match(name) or _LISTED_RECORD.match(name) or _LISTED_AUDIT.match(name)
            if (match and int(match.group(1)) > round_number) or name == f"{RECORDS}/final.json":
                later.append(self.run_dir / name)
        self.manifest.finish({}, retire=later, rounds_done=round_number)
        self.delete(later)

"""Before a run continues: every file the continuation depends on is the one fedexperts wrote.

Continuing after round ``r`` needs the run record and the records of rounds ``1..r``, the
checkpoint of round ``r`` (readable, of that round), every client's committed personal state (none
trained after ``r``) and, for a plain resume, the final record if there is one. Each is checked
against the size and sha256 the manifest recorded when it was written. A mismatch stops the run
with one line naming the file and what was expected, and the newest round that *is* a consistent
point to continue from (``--resume-from``), if any.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedexperts.atomic import TEMPORARY
from fedexperts.errors import RunError
from fedexperts.federation.runstore import CHECKPOINTS, CLIENTS, RECORDS, RunStore
from fedexperts.federation.state import STAGING
from fedexperts.interface import PayloadError
from fedexperts.runfiles import MANIFEST, mismatch


class ResumeError(RunError):
    """A run directory that cannot be continued as asked: a file it depends on is missing or changed."""


def _unlisted(store: RunStore) -> list[str]:
    """Files in the state folders that this run did not write (they would be read as its own)."""
    found = []
    for folder in (RECORDS, CHECKPOINTS, CLIENTS):
        for root, dirs, files in os.walk(store.run_dir / folder):
            dirs[:] = [name for name in dirs if name != STAGING]  # staged states are checked when committed
            for name in files:
                relative = Path(os.path.relpath(Path(root) / name, store.run_dir)).as_posix()
                if not store.manifest.owns(relative) and not TEMPORARY.match(name):
                    found.append(relative)
    return sorted(found)


class _Checker:
    """Problems of each candidate point, every file checked once."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.clients = {name: entry for name, entry in store.manifest.files.items() if entry.round is not None}
        self._found: dict[str, str | None] = {}
        self._headers: dict[int, str | None] = {}

    def file(self, name: str) -> str | None:
        if name not in self._found:
            entry = self.store.manifest.files.get(name)
            problem = f"is not listed in {MANIFEST}" if entry is None else mismatch(self.store.run_dir / name, entry)
            self._found[name] = None if problem is None else f"{name} {problem}"
        return self._found[name]

    def checkpoint(self, round_number: int) -> str | None:
        problem = self.file(f"{CHECKPOINTS}/round-{round_number:06d}.safetensors")
        if problem is not None:
            return problem
        if round_number not in self._headers:
            try:
                self.store.checkpoints.check(round_number)
                self._headers[round_number] = None
            except PayloadError as error:
                self._headers[round_number] = str(error)
        return self._headers[round_number]

    def at(self, round_number: int, *, final: bool) -> list[str]:
        """What keeps the run from continuing after ``round_number`` (empty: it is a consistent point)."""
        names = [f"{RECORDS}/run.json"] if round_number or self.store.has_record("run") else []
        names += [f"{RECORDS}/round-{r:06d}.json" for r in range(1, round_number + 1)]
        names += sorted(self.clients)
        names += [f"{RECORDS}/final.json"] if final and self.store.has_record("final") else []
        problems = [problem for problem in map(self.file, names) if problem is not None]
        if round_number:
            checkpoint = self.checkpoint(round_number)
            problems += [checkpoint] if checkpoint is not None else []
        problems += [
            f"{name} was trained in round {entry.round}, after round {round_number}"
            for name, entry in sorted(self.clients.items())
            if entry.round is not None and entry.round > round_number
        ]
        return problems


def check_resume(store: RunStore, resume_from: int | None = None) -> int:
    """The round to continue after (``resume_from``, default the last committed one), once verified."""
    run_dir, done = store.run_dir, store.rounds_done
    foreign = _unlisted(store)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ResumeError(
            f"cannot resume {run_dir}: {foreign[0]}{more} was not written by this run; move it out of the run directory"
        )
    if resume_from is not None and not 1 <= resume_from <= done:
        completed = f"rounds 1 to {done}" if done else "no round"
        raise ResumeError(f"--resume-from {resume_from}: {run_dir} has completed {completed}")
    target = done if resume_from is None else resume_from
    checker = _Checker(store)
    problems = checker.at(target, final=resume_from is None)
    if not problems:
        return target
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    # a plain resume may still continue after its last round without the final record (which is then redone)
    earlier = [r for r in reversed(store.checkpoint_rounds()) if r <= done and (r != target or resume_from is None)]
    point = next((r for r in earlier if not checker.at(r, final=False)), None)
    newest_state = max((entry.round or 0 for entry in checker.clients.values()), default=0)
    why = (
        f" (the clients' personal states are from round {newest_state})"
        if earlier and newest_state > min(earlier)
        else ""
    )
    advice = (
        f"the newest consistent point is round {point}: rerun with --resume-from {point}"
        if point is not None
        else f"no earlier consistent point remains{why}: restore the file, or start over with --overwrite"
    )
    raise ResumeError(f"cannot resume {run_dir} after round {target}: {problems[0]}{more}; {advice}")

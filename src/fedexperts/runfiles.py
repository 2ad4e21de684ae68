"""A run directory's manifest: which files fedexperts wrote there, their size and sha256.

fedexperts marks every run directory it makes with ``.fedexperts-run.json`` and lists in it each
file it writes there, so that ``--overwrite`` deletes only those (and refuses when anything else is
in the folder), and ``--resume`` can tell a truncated, edited or missing file from the one it wrote.
A file is first put in ``pending`` (about to be written, or about to be deleted), then, once it is
in place, entered with its size and digest; whatever is at a pending path is fedexperts' own, even
after a kill mid-write. The manifest is rewritten atomically after every change. One process
writes a run directory at a time.

Torch-free: the reports register the files they write here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedexperts.atomic import atomic_file
from fedexperts.errors import FedExpertsError

MANIFEST = ".fedexperts-run.json"
_FORMAT = 1
_CHUNK = 1 << 20
_REMEMBERED = 1 << 16


@dataclass(frozen=True)
class FileEntry:
    """What a written file was: its size, its sha256, and for a client's personal state the round it was trained in."""

    size: int
    sha256: str
    round: int | None = None


_DIGESTS: dict[tuple[int, int, int, int], str] = {}
"""sha256 by (device, inode, size, mtime in ns): a file unchanged since it was hashed is not read again
(a resume checks its files before the model loads, and the server loop once more)."""


def describe(path: Path, *, round_number: int | None = None) -> FileEntry:
    """Size and sha256 of the file at ``path`` as it is now."""
    status = path.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    if key not in _DIGESTS:
        if len(_DIGESTS) >= _REMEMBERED:
            _DIGESTS.clear()
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return FileEntry(status.st_size, _DIGESTS[key], round_number)


def mismatch(path: Path, entry: FileEntry) -> str | None:
    """Why the file at ``path`` is not the one ``entry`` describes, or ``None`` when it is."""
    if not path.is_file():
        return f"is missing (fedexperts wrote {entry.size} bytes there)"
    size = path.stat().st_size
    if size != entry.size:
        return f"has {size} bytes, not the {entry.size} fedexperts wrote (truncated or replaced)"
    if describe(path).sha256 != entry.sha256:
        return "differs from what fedexperts wrote (its sha256 changed)"
    return None


class ManifestError(FedExpertsError):
    """A run directory's manifest that cannot be read."""


class RunManifest:
    """The manifest of one run directory; every change is saved at once (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        created_folder: bool,
        rounds_done: int = 0,
        files: Mapping[str, FileEntry] | None = None,
        pending: Iterable[str] = (),
        uid: str | None = None,
    ) -> None:
        self.folder = folder
        self.uid = uid or uuid.uuid4().hex
        """This run's own id, made when the run directory is: what Flower nodes key a run's personal states by,
        so that a resumed ServerApp (a new Flower run id) finds them, and a fresh run in the same folder does not."""
        self.created_folder = created_folder
        """fedexperts made the folder itself (so it may remove it once it holds nothing)."""
        self.rounds_done = rounds_done
        """The last round whose record, checkpoint and client states are all written and listed."""
        self.files = dict(files or {})
        self.pending = set(pending)

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: Path) -> RunManifest | None:
        """The manifest of ``folder``, or ``None`` when the folder has none."""
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
            files = {name: FileEntry(**entry) for name, entry in data["files"].items()}
            return cls(
                folder,
                created_folder=bool(data["created_folder"]),
                rounds_done=int(data["rounds_done"]),
                files=files,
                pending=data["pending"],
                uid=data.get("uid"),
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ManifestError(f"{path}: unreadable run manifest ({error})") from None

    def save(self) -> None:
        data: dict[str, Any] = {
            "format": _FORMAT,
            "uid": self.uid,
            "created_folder": self.created_folder,
            "rounds_done": self.rounds_done,
            "pending": sorted(self.pending),
            "files": {name: asdict(entry) for name, entry in sorted(self.files.items())},
        }
        with atomic_file(self.path) as staging:
            staging.write_text(json.dumps(data, indent=1), encoding="utf-8")

    def name(self, path: Path) -> str:
        """``path`` relative to the run directory, as the manifest lists it."""
        return Path(os.path.relpath(path, self.folder)).as_posix()

    def entry(self, path: Path) -> FileEntry | None:
        return self.files.get(self.name(path))

    def owns(self, name: str) -> bool:
        """Whether fedexperts wrote (or is writing) what is at the relative path ``name``."""
        return name in self.files or name in self.pending or name == MANIFEST

    def begin(self, paths: Iterable[Path]) -> None:
        """Mark ``paths`` as being written (or deleted); pending paths that no longer exist are forgotten."""
        self.pending = {name for name in self.pending if (self.folder / name).exists()}
        self.pending.update(self.name(path) for path in paths)
        self.save()

    def finish(
        self,
        written: Mapping[Path, FileEntry],
        *,
        retire: Iterable[Path] = (),
        rounds_done: int | None = None,
    ) -> None:
        """Enter the ``written`` files; move ``retire`` (about to be deleted) to pending; optionally commit a round."""
        for path, entry in written.items():
            name = self.name(path)
            self.files[name] = entry
            self.pending.discard(name)
        for path in retire:
            name = self.name(path)
            self.files.pop(name, None)
            self.pending.add(name)
        if rounds_done is not None:
            self.rounds_done = rounds_done
        self.save()

    def forget(self, paths: Iterable[Path]) -> None:
        """Drop ``paths`` (deleted) from the manifest."""
        for name in map(self.name, paths):
            self.files.pop(name, None)
            self.pending.discard(name)
        self.save()

    @contextmanager
    def writing(self, *paths: Path) -> Iterator[None]:
        """Around writing ``paths``: pending before, entered with their digests after."""
        self.begin(paths)
        yield
        self.finish({path: describe(path) for path in paths if path.is_file()})


@contextmanager
def tracked_writes(folder: Path, *paths: Path) -> Iterator[None]:
    """Around writing ``paths`` into ``folder``: listed in its manifest when ``folder`` is a run directory."""
    manifest = RunManifest.load(folder)
    if manifest is None:
        yield
        return
    with manifest.writing(*paths):
        yield

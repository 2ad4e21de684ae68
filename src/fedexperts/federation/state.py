"""State that must survive a crash: per-client personal state and server checkpoints, on disk.

Both are safetensors files written atomically (write beside, then rename), so a run killed at any
moment leaves either the previous state or the new one, never a torn file. Client state lives one
file per client, so a federation of thousands of clients never holds their states in memory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from fedexperts.atomic import save_tensors
from fedexperts.interface import Payload, PayloadError

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_METADATA_KEY = "fedexperts"
_ROUND_KEY = "fedexperts-round"
"""A staged client state's header names the round it was trained in (read back by :meth:`ClientStateStore.round_of`)."""
_CHECKPOINT = re.compile(r"^round-(\d{6})\.safetensors$")
_STAGED_ROUND = re.compile(r"^round-(\d{6})$")
STAGING = ".staging"
"""The folder (under a store's root) of states trained in a round that is not yet committed."""


def write_payload(path: Path, payload: Payload, *, trained_in: int | None = None) -> None:
    """Write ``payload`` atomically as safetensors, its metadata (and the round it was trained in) in the header."""
    metadata = {_METADATA_KEY: json.dumps(payload.metadata, sort_keys=True, allow_nan=False)}
    if trained_in is not None:
        metadata[_ROUND_KEY] = str(trained_in)
    save_tensors(path, payload.tensors, metadata)


def _read(path: Path, *, tensors: bool) -> tuple[dict[str, str], Payload]:
    """The file's raw header and the payload in it; any unreadable part is one ``PayloadError`` naming the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            metadata = json.loads(header.get(_METADATA_KEY, "{}"))
            loaded = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}  # noqa: SIM118
    except (SafetensorError, ValueError, OSError) as error:
        raise PayloadError(f"{path}: unreadable state file ({error})") from error
    return header, Payload(loaded, metadata)


def read_payload(path: Path, *, tensors: bool = True) -> Payload:
    """What :func:`write_payload` wrote (``tensors=False``: the metadata only, from the header)."""
    return _read(path, tensors=tensors)[1]


class ClientStateStore:
    """One safetensors file per client under ``root``, with per-round staging.

    A client's new state is first *staged* under the round it was trained in, and becomes the
    client's state only when the runtime *commits* that round (after the server checkpoint of the
    round is safely written). A run killed mid-round therefore resumes from the states the
    checkpoint belongs to, and redoes the round exactly.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._committed = {path.stem for path in self.root.glob("*.safetensors")} if self.root.is_dir() else set()

    def path(self, client_id: str) -> Path:
        if not _CLIENT_ID.match(client_id):
            raise PayloadError(
                f"client id {client_id!r} must be 1-128 letters, digits, '_', '.' or '-' (not starting with one)"
            )
        return self.root / f"{client_id}.safetensors"

    def save(self, client_id: str, state: Payload) -> None:
        write_payload(self.path(client_id), state)

    def load(self, client_id: str) -> Payload | None:
        """The client's committed state, or ``None`` before its first committed round.

        A state this store committed (or found when it opened) that has since vanished is an error,
        never a fresh start.
        """
        path = self.path(client_id)
        if path.exists():
            return read_payload(path)
        if client_id in self._committed:
            raise PayloadError(f"{path}: the committed personal state of {client_id} is missing")
        return None

    def round_of(self, client_id: str) -> int | None:
        """The round the client's committed state was trained in (``None``: no committed state yet).

        Read from the file's header, so a check of which round each node holds reads no tensor.
        """
        path = self.path(client_id)
        if not path.exists():
            return None
        trained_in = _read(path, tensors=False)[0].get(_ROUND_KEY)
        if trained_in is None or not trained_in.isdigit():
            raise PayloadError(f"{path}: its header does not name the round it was trained in")
        return int(trained_in)

    def _staging(self, round_number: int) -> Path:
        return self.root / STAGING / f"round-{round_number:06d}"

    def staged(self, round_number: int) -> dict[Path, Path]:
        """The round's staged states: where :meth:`commit` will put each -> where it is now."""
        staging = self._staging(round_number)
        found = sorted(staging.glob("*.safetensors")) if staging.is_dir() else []
        return {self.root / path.name: path for path in found}

    def stage(self, round_number: int, client_id: str, state: Payload) -> None:
        """Write a client's state trained in ``round_number``; it takes effect at :meth:`commit`."""
        self.path(client_id)  # validates the id
        write_payload(self._staging(round_number) / f"{client_id}.safetensors", state, trained_in=round_number)

    def unstage(self, round_number: int, client_id: str) -> None:
        """Forget a staged state (its client's update was rejected)."""
        (self._staging(round_number) / f"{client_id}.safetensors").unlink(missing_ok=True)

    def commit(self, round_number: int) -> None:
        """Make the round's staged states current (idempotent: a crash half-way is finished by a retry)."""
        staging = self._staging(round_number)
        if not staging.is_dir():
            return
        for staged in sorted(staging.glob("*.safetensors")):
            staged.replace(self.root / staged.name)
            self._committed.add(staged.stem)
        shutil.rmtree(staging)

    def discard_staged(self, *, after: int) -> None:
        """Drop what was staged for rounds after ``after`` (work of a round that never completed)."""
        parent = self.root / STAGING
        if not parent.is_dir():
            return
        for folder in parent.iterdir():
            match = _STAGED_ROUND.match(folder.name)
            if match and int(match.group(1)) > after:
                shutil.rmtree(folder)


class CheckpointStore:
    """Server checkpoints ``round-NNNNNN.safetensors``; which ones belong to the run, the run's manifest says."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, round_number: int) -> Path:
        return self.root / f"round-{round_number:06d}.safetensors"

    def save(self, round_number: int, state: Payload) -> Path:
        path = self.path(round_number)
        write_payload(path, Payload(state.tensors, {**state.metadata, "round": round_number}))
        return path

    def load(self, round_number: int) -> Payload:
        """The checkpoint of ``round_number``; its recorded round must be that round."""
        state = read_payload(self.path(round_number))
        self._check_round(round_number, state.metadata)
        return state

    def check(self, round_number: int) -> None:
        """Read only the header of the round's checkpoint: a safetensors file of that round (else ``PayloadError``)."""
        self._check_round(round_number, read_payload(self.path(round_number), tensors=False).metadata)

    def _check_round(self, round_number: int, metadata: dict[str, Any]) -> None:
        if metadata.get("round") != round_number:
            raise PayloadError(
                f"{self.path(round_number)}: holds round {metadata.get('round')!r}, expected {round_number}"
            )

    def rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (_CHECKPOINT.match(path.name) for path in self.root.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def latest(self) -> tuple[int, Payload] | None:
        """``(round, state)`` of the newest checkpoint, or ``None`` when there is none."""
        rounds = self.rounds()
        if not rounds:
            return None
        return rounds[-1], self.load(rounds[-1])

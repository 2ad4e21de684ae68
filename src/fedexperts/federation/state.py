"""State that must survive a crash: per-client personal state and server checkpoints, on disk.

Both are safetensors files written atomically (write beside, then rename), so a run killed at any
moment leaves either the previous state or the new one, never a torn file. Client state lives one
file per client, so a federation of thousands of clients never holds their states in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from fedexperts.atomic import save_tensors
from fedexperts.federation.payload import Payload, PayloadError

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_METADATA_KEY = "fedexperts"
_CHECKPOINT = re.compile(r"^round-(\d{6})\.safetensors$")


def _write(path: Path, payload: Payload) -> None:
    metadata = {_METADATA_KEY: json.dumps(payload.metadata, sort_keys=True, allow_nan=False)}
    save_tensors(path, payload.tensors, metadata)


def _read(path: Path) -> Payload:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, OSError) as error:
        raise PayloadError(f"{path}: unreadable state file ({error})") from error
    return Payload(tensors, metadata)


class ClientStateStore:
    """One safetensors file per client under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, client_id: str) -> Path:
        if not _CLIENT_ID.match(client_id):
            raise PayloadError(
                f"client id {client_id!r} must be 1-128 letters, digits, '_', '.' or '-' (not starting with one)"
            )
        return self.root / f"{client_id}.safetensors"

    def save(self, client_id: str, state: Payload) -> None:
        _write(self.path(client_id), state)

    def load(self, client_id: str) -> Payload | None:
        """The client's saved state, or ``None`` before its first round."""
        path = self.path(client_id)
        return _read(path) if path.exists() else None


class CheckpointStore:
    """Server checkpoints ``round-NNNNNN.safetensors``; the newest complete one is the resume point."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(self, round_number: int, state: Payload) -> Path:
        path = self.root / f"round-{round_number:06d}.safetensors"
        _write(path, Payload(state.tensors, {**state.metadata, "round": round_number}))
        for old in self.rounds()[: -self.keep]:
            (self.root / f"round-{old:06d}.safetensors").unlink()
        return path

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
        state = _read(self.root / f"round-{rounds[-1]:06d}.safetensors")
        return rounds[-1], state

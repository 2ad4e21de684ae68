"""Atomic writes: a crash mid-save never leaves a half-written file or folder in place.

Torch-free (:func:`save_file` imports it when called), so run manifests are too.

The temporary beside the target is created with the ordinary modes (0666 for a file, 0777 for a
folder, less the umask), not ``tempfile``'s private 0600/0700, so what lands in place is readable
as any file the user writes. Its name is ``.{target name}.{8 hex digits}.tmp``, which
:data:`TEMPORARY` matches: a run directory's leftover of fedexperts' own (after a hard kill).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
"""The name of what :func:`atomic_file` leaves beside its target when the process is killed mid-write."""


def _beside(target: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new, uniquely named ``.{name}.{hex}{suffix}`` beside ``target``, made by ``create`` (which never reuses)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name beside {target}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies


def _new_folder(path: Path) -> None:
    path.mkdir(mode=0o777)  # the umask applies


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    target = Path(path)
    temporary = _beside(target, ".tmp", _new_file)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it takes ``path``'s place.

    An existing folder at ``path`` is kept until the new one is complete.
    """
    target = Path(path)
    staging = _beside(target, ".tmp", _new_folder)
    try:
        yield staging
        if target.exists():
            retired = _beside(target, ".old", _new_folder)
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextmanager
def atomic_new_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it becomes ``path``, which must be new or empty.

    Unlike :func:`atomic_directory`, nothing at ``path`` is ever deleted: the final rename replaces an
    empty folder only, and fails (``OSError``) if a file or a non-empty folder is there by then.
    Every file written inside gets the usual mode (0666 less the umask), whatever its writer chose.
    """
    target = Path(path)
    staging = _beside(target, ".tmp", _new_folder)
    try:
        yield staging
        _usual_file_modes(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _usual_file_modes(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~umask)


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, imported when first called: the rest of this module (run manifests) is torch-free."""
    from safetensors.torch import save_file as save

    save(dict(tensors), path, metadata=metadata)


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (tensors detached, made contiguous, moved to the CPU)."""
    target = Path(path)
    prepared = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_file(target) as staging:
        mode = staging.stat().st_mode  # safetensors writes a file of its own (0600): give it back the usual mode
        save_file(prepared, str(staging), metadata=dict(metadata or {}))
        os.chmod(staging, stat.S_IMODE(mode))
    return target

"""How a failed command is reported: one line for what the user can fix, a short traceback for a bug.

A :class:`~fedexperts.errors.FedExpertsError` or a fixable ``OSError`` (disk full, no permission,
read-only) is one red line and exit code 2; anything else is the error, its innermost frames and
exit code 1; the global ``--debug`` adds Python's full traceback. Torch-free, like the config, so an
error is printed without loading the heavy stack. Nothing here ever prints a frame's local
variables: they hold clients' token ids, data rows and weight tensors.
"""

from __future__ import annotations

import errno
import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from fedexperts.errors import FedExpertsError

_F = TypeVar("_F", bound=Callable[..., Any])

_MESSAGE_LIMIT = 400
"""An unexpected error's message is cut after this many characters (a library may put data in it)."""
_FRAMES = 4
"""Frames shown of an unexpected error's traceback (the innermost); ``--debug`` shows every frame."""

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another output_dir / --run-dir",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another output_dir / --run-dir",
    errno.EACCES: "you lack permission: choose another path (output_dir, --run-dir, --out) or fix its permissions",
    errno.EPERM: "the operation is not permitted: choose another path or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another output_dir / --run-dir",
    errno.EISDIR: "a folder is where a file was expected",
    errno.ENOTDIR: "a file is where a folder was expected",
    errno.EEXIST: "something already exists there",
    errno.ENAMETOOLONG: "the path is too long",
}


def environment_problem(error: BaseException) -> str | None:
    """One line for an ``OSError`` the user can fix (disk full, no permission, read-only...), else ``None``."""
    if not isinstance(error, OSError) or error.errno not in _OS_HINTS:
        return None
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or type(error).__name__} ({_OS_HINTS[error.errno]})"


def clip_message(text: str) -> str:
    """The first line of ``text``, at most a few hundred characters (marked where cut)."""
    first, *rest = text.strip().splitlines() or [""]
    if rest or len(first) > _MESSAGE_LIMIT:
        return f"{first[:_MESSAGE_LIMIT]} ... (cut; --debug shows it all)"
    return first


def short_traceback(error: BaseException) -> str:
    """The error's type and (clipped) message and its innermost frames as ``file:line in function``.

    No source lines and no locals: enough to report the bug, nothing of the user's data.
    """
    frames = traceback.extract_tb(error.__traceback__)[-_FRAMES:]
    lines = [f"unexpected {type(error).__name__}: {clip_message(str(error))}"]
    for frame in frames:
        lines.append(f"  at {_short_path(frame.filename)}:{frame.lineno} in {frame.name}")
    lines.append("this is a bug or an unsupported setup; rerun with `fedexperts --debug ...` for the full traceback")
    return "\n".join(lines)


def full_traceback(error: BaseException) -> str:
    """Every frame with its source line (Python's own format), still without locals."""
    return "".join(traceback.format_exception(error)).rstrip()


def _short_path(filename: str) -> str:
    """``fedexperts/training.py`` rather than the full site-packages path."""
    parts = Path(filename).parts
    for anchor in ("fedexperts", "site-packages"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return str(Path(*parts[index + (anchor == "site-packages") :]))
    return filename


def _debug() -> bool:
    """The global ``--debug`` flag (the root command keeps its options in ``obj``)."""
    context = click.get_current_context(silent=True)
    options = context.find_root().obj if context is not None else None
    return bool(isinstance(options, dict) and options.get("debug"))


def report(error: Exception) -> NoReturn:
    """Print ``error`` as this module's docstring says, on stderr, and exit."""
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    if _debug():
        errors.print(full_traceback(error), markup=False)
    problem = str(error) if isinstance(error, FedExpertsError) else environment_problem(error)
    if problem is not None:
        errors.print(f"[bold red]error:[/] {escape(problem)}")
        sys.exit(2)
    if not _debug():
        errors.print(short_traceback(error), markup=False)
    sys.exit(1)


def user_errors(command: _F) -> _F:
    """A CLI command whose errors go through :func:`report` (click's own exits and usage errors pass)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:
            report(error)

    return wrapper  # type: ignore[return-value]

"""An experiment config as commented TOML (``fedexperts config show``), which the loader reads back as is.

Every key is preceded by its description (the field's docstring) and what it accepts. By default only
the keys that differ from their defaults are written (``algorithm.name`` always); ``every_key`` writes
all of them. Torch-free, like the config.
"""

from __future__ import annotations

import re
import textwrap
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import tomli_w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedexperts.algorithms.registry import DEFAULT_ALGORITHM, algorithm_names
from fedexperts.config import LOCAL_DATA_SUFFIXES, ExperimentConfig, names_local_path

_WIDTH = 100


def config_toml(config: ExperimentConfig, *, every_key: bool = False) -> str:
    """``config`` as TOML with a comment above each key; ``every_key``: defaults included."""
    header = [
        f"# fedexperts experiment {config.name!r}: `fedexperts run THIS_FILE` runs it.",
        "# Every key, its default and range: `fedexperts config show --defaults`."
        if not every_key
        else "# Every key with its description; a key left out keeps its default.",
    ]
    body = _section(config, (), every_key)
    return "\n".join([*header, "", *body]).replace("\n\n\n", "\n\n").rstrip() + "\n"


def _section(model: BaseModel, path: tuple[str, ...], every_key: bool) -> list[str]:
    """The lines of one table: its own keys first (TOML needs them before the sub-tables), then sub-tables."""
    defaults = type(model)().model_dump(mode="json")  # every section has a default for every key
    values = model.model_dump(mode="json")
    keys, tables = [], []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            child = _section(value, (*path, name), every_key)
            if child:
                described = _comment(info.description) if info.description else []
                tables += ["", *described, f"[{'.'.join((*path, name))}]", *child]
            continue
        if path == ("algorithm",) and name == "name":  # always written: it chooses the other keys
            keys += _key(
                name, info, values[name], DEFAULT_ALGORITHM, "one of " + ", ".join(map(_toml_value, algorithm_names()))
            )
        elif every_key or values[name] != defaults.get(name):
            keys += _key(name, info, _absolute(path, name, values[name]), defaults.get(name), _accepts(info))
    if not keys and not tables:
        return []
    return [*keys, *tables]


_LOCAL_OR_NAMED = {("model", "name"): (), ("data", "source"): LOCAL_DATA_SUFFIXES}
"""Text keys that are a local path or else a keyword or hub name."""
_PATHS = {("output_dir",), ("eval", "mmlu")}


def _absolute(path: tuple[str, ...], name: str, value: Any) -> Any:
    """A relative path made absolute: in a file it would be read relative to the file's folder."""
    key = (*path, name)
    if not isinstance(value, str) or Path(value).expanduser().is_absolute():
        return value
    if key in _PATHS or (key in _LOCAL_OR_NAMED and names_local_path(value, Path.cwd(), _LOCAL_OR_NAMED[key])):
        return str(Path(value).expanduser().absolute())
    return value


def _key(name: str, info: FieldInfo, value: Any, default: Any, accepts: str) -> list[str]:
    lines = _comment(info.description) if info.description else []
    default_text = "unset" if default is None else _toml_value(default)
    lines.append(f"# {accepts}; default {default_text}" if accepts else f"# default {default_text}")
    if value is None:
        return [*lines, f"# {name} = (unset)"]
    return [*lines, f"{name} = {_toml_value(value)}"]


def _toml_value(value: Any) -> str:
    """A TOML value on one line (tomli_w writes arrays over several)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"value": value}).partition("=")[2].strip()


def _comment(text: str | None) -> list[str]:
    plain = " ".join(re.sub(r":\w+:`", "`", (text or "").replace("``", "`")).split())
    return [f"# {line}" for line in textwrap.wrap(plain, _WIDTH - 2)]


def _accepts(info: FieldInfo) -> str:
    """What a key takes, from its annotation and constraints: ``integer >= 1``, ``one of "iid", ...``."""
    annotation: Any = info.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    optional = type(None) in options
    kinds = [_kind(option) for option in options if option is not type(None)]
    bounds = " and ".join(bound for bound in map(_bound, info.metadata) if bound)
    text = " ".join(part for part in (" or ".join(kind for kind in kinds if kind), bounds) if part)
    return f"{text} (or unset)" if optional and text else text


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(_toml_value(item) for item in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(_toml_value(item.value) for item in annotation)
    if get_origin(annotation) is list:
        item = get_args(annotation)[0] if get_args(annotation) else Any
        return f"a list of {_kind(item) or 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    if annotation in names:
        return names[annotation]
    return "a path" if getattr(annotation, "__name__", "") == "Path" else ""


def _bound(item: Any) -> str:
    if isinstance(item, annotated_types.Ge):
        return f">= {item.ge}"
    if isinstance(item, annotated_types.Gt):
        return f"> {item.gt}"
    if isinstance(item, annotated_types.Le):
        return f"<= {item.le}"
    if isinstance(item, annotated_types.Lt):
        return f"< {item.lt}"
    if isinstance(item, annotated_types.MinLen):
        return f"of at least {item.min_length}"
    return ""

"""The package's shape: scheduling modules import no model code; only ``views`` and ``algorithm`` may."""

import ast
from pathlib import Path

import pytest

import fedexperts.algorithms.fedmoe as package

FOLDER = Path(package.__file__).parent
MODEL_FREE = ["activation", "aggregate", "config", "layout", "recommend", "records", "schedule", "search"]
MODEL_CODE = ("torch.nn", "transformers", "peft", "fedexperts.moe", "fedexperts.models", "fedexperts.training")
MODEL_SIDE = ("fedexperts.algorithms.fedmoe.views", "fedexperts.algorithms.fedmoe.algorithm")


def imported(module):
    tree = ast.parse((FOLDER / f"{module}.py").read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", MODEL_FREE)
def test_scheduling_modules_import_no_model_code(module):
    bad = [name for name in imported(module) if name.startswith(MODEL_CODE + MODEL_SIDE)]
    assert not bad, f"{module} imports {bad}"


def test_the_package_module_imports_nothing():
    assert imported("__init__") == []  # reading the config (the registry does) must not load torch


def test_every_module_is_small_and_documented():
    for path in FOLDER.glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name
        assert ast.get_docstring(ast.parse(path.read_text())), path.name

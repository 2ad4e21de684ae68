"""``examples/``: a commented config per algorithm and per study, each one the loader accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedexperts.algorithms.registry import algorithm_names
from fedexperts.config import check_local_paths, load_config
from fedexperts.studies import STUDIES, split_method

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.toml")), ids=lambda path: str(path.relative_to(EXAMPLES)))
def test_every_example_validates_and_explains_itself(path):
    config = load_config(path)
    check_local_paths(config)  # built-in model and data, or hub names: nothing local is missing
    assert path.read_text().startswith("# "), "an example opens with what it is for"


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_has_an_example_that_runs_it(name):
    config = load_config(EXAMPLES / f"{name}.toml")
    assert config.algorithm.name == name and config.name == name
    assert f"fedexperts run examples/{name}.toml" in (EXAMPLES / f"{name}.toml").read_text()


@pytest.mark.parametrize("study", STUDIES.values(), ids=lambda study: study.name)
def test_every_study_has_an_example_with_the_same_runs(study):
    path = EXAMPLES / "studies" / f"{study.name}.toml"
    for method in study.algorithms:
        algorithm, variant = split_method(method)
        extra = [*study.method_overrides.get(algorithm, ()), *study.variants.get(variant or "", ())]
        from_file = load_config(path, [f"algorithm.name={algorithm}", *extra])
        assert from_file == load_config(None, [*study.run_overrides(method), f"name={study.name}"]), method


def test_the_readme_points_at_the_examples():
    readme = (ROOT / "README.md").read_text()
    assert "examples/" in readme and "fedexperts config show" in readme

import ast
from pathlib import Path

import pytest

import fedexperts.algorithms as algorithms_package
from fedexperts.algorithms.registry import CONFIGS, algorithm_names, build_algorithm, config_class, owners
from fedexperts.interface import ClientContext, ClientInfo, LocalData
from fedexperts.models import tiny_model

PACKAGE = Path(algorithms_package.__file__).parent


def test_names_are_unique_and_each_config_builds_its_algorithm():
    names = algorithm_names()
    assert len(names) == len(set(names)) == len(CONFIGS)
    for name in names:
        algorithm = build_algorithm(config_class(name)(), client_ids=["client-0", "client-1"])
        assert algorithm.name == name


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_returns_a_client_context_and_keeps_no_client_state(name):
    algorithm = build_algorithm(config_class(name)(), client_ids=["client-0"])
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    before = sorted(vars(algorithm))
    client = ClientInfo("client-0", 4)
    context = algorithm.setup_client(
        model, algorithm.downlink(algorithm.initial_global_state(model), client), None, LocalData(client)
    )
    assert isinstance(context, ClientContext) and context.client == client
    algorithm.uplink(context)
    algorithm.personal_state(context)
    assert sorted(vars(algorithm)) == before


def test_a_key_is_owned_by_the_algorithms_that_declare_it():
    assert owners("flex") == ["flex"]
    assert owners("mu") == ["fedprox"]
    assert owners("fedmoe.seed") == ["random-moe"]
    assert set(owners("server.rule")) >= {"fedavg", "flex", "fedmoe", "dense"}
    assert "local" not in owners("server")


def test_no_algorithm_module_imports_a_runtime():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            assert not any(m.startswith("fedexperts.federation") for m in modules), path

"""Every preset study validates for every one of its methods (configs only: no model is loaded)."""

import pytest
from typer.testing import CliRunner

from fedexperts.cli import app
from fedexperts.config import load_config
from fedexperts.errors import FedExpertsError
from fedexperts.studies import STUDIES, split_method

CASES = [(study, method) for study in STUDIES.values() for method in study.algorithms]


@pytest.mark.parametrize("study, method", CASES, ids=lambda value: getattr(value, "name", value))
def test_every_study_validates_for_each_of_its_methods(study, method):
    config = load_config(None, [*study.run_overrides(method), f"name={study.name}"])
    assert config.algorithm.name == split_method(method)[0]


def test_the_fedmoe_paper_presets_run_each_method_on_the_papers_model():
    from fedexperts.config import round_size

    for name, per_round, sampling in (("fedmoe-paper", 5, "random"), ("fedmoe-paper-distinct", 3, "distinct")):
        study = STUDIES[name]
        configs = {method: load_config(None, study.run_overrides(method)) for method in study.algorithms}
        models = {method: config.model.name for method, config in configs.items()}
        assert models == {
            "dense@switch-8": "builtin:switch-8",
            "dense@switch-32": "builtin:switch-32",
            "fedavg@switch-32": "builtin:switch-32",
            "random-moe@switch-32": "builtin:switch-32",
            "fedmoe@switch-32": "builtin:switch-32",
        }
        for method, config in configs.items():
            federation = config.federation
            assert federation.clients == 30 and federation.sampling == sampling
            assert round_size(federation.clients, federation.fraction, federation.min_clients) == per_round
            assert config.data.categories == ["classification", "closed_qa", "summarization"]
            assert (config.data.scheme, config.data.classes_per_client) == ("pathological", 1)
            sub_moe = split_method(method)[0] in ("fedmoe", "random-moe")
            assert (federation.client_model == "sub-moe") is sub_moe
        assert study.reference == "fedmoe@switch-32" and study.tasks


def test_a_method_variant_the_study_does_not_define_is_named():
    assert split_method("fedavg@switch-8") == ("fedavg", "switch-8") and split_method("flex") == ("flex", None)
    with pytest.raises(FedExpertsError, match="study 'fedmoe-paper' has no variant 'switch-64'"):
        STUDIES["fedmoe-paper"].run_overrides("dense@switch-64")
    result = CliRunner().invoke(app, ["compare", "--algorithms", "fedavg@switch-8"])
    assert result.exit_code == 2 and "needs a --study" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["flex-paper-pathological", "flex-paper-dirichlet", "flex-paper-dirichlet-1.0"])
def test_the_flex_paper_presets_carry_the_papers_settings(name):
    study = STUDIES[name]
    flex = load_config(None, study.run_overrides("flex"))
    assert flex.model.name == "Qwen/Qwen1.5-MoE-A2.7B" and flex.model.dtype == "bfloat16"
    assert flex.data.source == "databricks/databricks-dolly-15k"
    assert flex.data.categories == ["closed_qa", "information_extraction", "classification", "summarization"]
    assert flex.data.test_per_category == 100 and flex.data.max_length == 512
    lora = flex.algorithm.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (32, 64, 0.05, ["q_proj", "k_proj", "v_proj"])
    train = flex.train
    assert (train.steps_per_round, train.batch_size, train.learning_rate, train.min_learning_rate) == (5, 4, 4e-5, 1e-6)
    assert train.router_aux_loss_coef == 0.001 and flex.federation.rounds == 100 and flex.eval.max_new_tokens == 256
    if name == "flex-paper-pathological":
        assert (flex.federation.clients, flex.data.scheme, flex.data.classes_per_client) == (4, "pathological", 1)
    else:
        assert (flex.federation.clients, flex.data.scheme, flex.data.rows_per_client) == (10, "dirichlet", 1000)
        assert flex.data.alpha == (0.5 if name == "flex-paper-dirichlet" else 1.0)
    baseline = load_config(None, study.run_overrides("random-expert"))
    assert baseline.algorithm.personal is True  # type: ignore[union-attr]
    local = load_config(None, [*study.run_overrides("local"), "model.name=/models/qwen", "data.source=dolly.jsonl"])
    assert (local.model.name, local.data.source) == ("/models/qwen", "dolly.jsonl")


def test_the_paper_presets_are_listed():
    result = CliRunner().invoke(app, ["compare", "--list-studies"])
    assert result.exit_code == 0, result.output
    assert "flex-paper-pathological" in result.output and "flex-paper-dirichlet" in result.output
    assert "random-expert" in result.output


def _documented_compare_commands():
    """Every ``fedexperts compare --study`` command in docs/RESULTS.md, continuation lines joined."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "RESULTS.md").read_text(encoding="utf-8").replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.startswith("fedexperts compare --study")]


def test_the_results_page_commands_name_real_studies_with_valid_overrides():
    commands = _documented_compare_commands()
    assert len(commands) >= 4
    for words in commands:
        preset = STUDIES[words[words.index("--study") + 1]]
        overrides = [word for word in words if "=" in word and not word.startswith("--")]
        for method in preset.algorithms:
            load_config(None, [*preset.run_overrides(method), *overrides])

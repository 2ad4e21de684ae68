"""The README's family table is what the code says works on each family."""

from pathlib import Path

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from fedexperts.errors import FedExpertsError
from fedexperts.moe import FAMILIES
from fedexperts.moe.descriptors import DESCRIPTORS
from fedexperts.planning.support import BEGIN, END, family_support, family_table, table_in, write_family_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def table():
    return family_table()


@pytest.mark.skipif(
    any(family.model_type not in CONFIG_MAPPING for family in DESCRIPTORS),
    reason="this transformers lacks a family the README's table lists",
)
def test_the_readme_table_is_the_rendered_one(table):
    assert table_in(README) == table, "regenerate it: fedexperts families --write README.md"


def test_one_row_per_descriptor_and_refusals_carry_the_algorithms_message(table):
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == [family.model_type for family in DESCRIPTORS]
    switch = family_support(FAMILIES["switch_transformers"]).checks
    assert switch["surgery"] == switch["FLEx"] == switch["attention LoRA"] == switch["FedMoE"] == "yes"
    assert switch["FedDPA"].startswith("no: feddpa supports decoder-only models")
    assert family_support(FAMILIES["olmoe"]).checks["FedDPA"] == "yes"
    assert family_support(FAMILIES["ernie4_5_moe"]).checks["FedMoE"].startswith("no: ")  # its (1, E) bias


def test_writing_replaces_only_the_marked_part(tmp_path):
    target = tmp_path / "doc.md"
    target.write_text(f"before\n{BEGIN}\nstale\n{END}\nafter\n")
    write_family_table(target, "| new |")
    assert target.read_text() == f"before\n{BEGIN}\n\n| new |\n\n{END}\nafter\n"
    assert table_in(target) == "| new |"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(FedExpertsError, match="has no family table part"):
        write_family_table(tmp_path / "plain.md", "| x |")
    with pytest.raises(FedExpertsError, match="does not exist"):
        write_family_table(tmp_path / "missing.md", "| x |")

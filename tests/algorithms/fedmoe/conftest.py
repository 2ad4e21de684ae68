import pytest

from fedexperts.models import tiny_model
from tests.algorithms.fedmoe.common import fedmoe


@pytest.fixture(scope="module")
def sizes():
    """Full and smallest sub-MoE bytes of the tiny OLMoE with attention LoRA, and one expert's bytes."""
    probe = fedmoe(budget_fraction=1.0)
    probe.prepare(tiny_model("olmoe"))
    return probe.full_bytes, probe.min_bytes, probe.layout.expert_bytes[0]

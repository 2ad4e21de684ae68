"""One tiny federation per algorithm (1 round, 1 step, 2 clients), each client's in-run logits captured.

The base is a random-weight OLMoE of the micro recipe's shape with the built-in tokenizer (no
pretraining). During each run's final evaluation a spy on ``setup_client`` records the logits of
the model every client is evaluated on, on :data:`FIXED` inputs: what an export must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedexperts.algorithms.registry import algorithm_names

FIXED_SHAPE = (2, 12)

VARIANTS: dict[str, tuple[str, ...]] = {
    **{name: (f"algorithm.name={name}",) for name in algorithm_names()},
    "fedprox": ("algorithm.name=fedprox", "algorithm.mu=0.1"),
    "flex-lora": ("algorithm.name=flex", "algorithm.flex.personal_training=lora"),
    "fedmoe-measured": (
        "algorithm.name=fedmoe",
        "algorithm.fedmoe.warmup_rounds=0",
        "algorithm.fedmoe.budget_fraction=0.8",
    ),
}
"""Every algorithm in the registry, plus FLEx with personal LoRA, and FedMoE with client-0 measuring ``p`` in round 1,
so that client-1's sub-MoE keeps a different number of experts in each layer. FedDPA's clients
mix two adapters per example, which no folder of plain weights reproduces: their export is refused."""
CLIENTS = ("client-0", "client-1")


def expected_kind(variant: str, client: str) -> str:
    """``personalized`` where no stock config describes the client model (grafted experts, per-layer counts)."""
    grafted = variant in ("flex", "flex-lora")
    per_layer = variant == "fedmoe-measured" and client == "client-1"  # client-0 holds the full model: it profiles
    if variant == "feddpa":
        return "refused"
    return "personalized" if grafted or per_layer else "stock"


RUN = (
    "federation.clients=2",
    "federation.rounds=1",
    "train.steps_per_round=1",
    "train.learning_rate=0.05",
    "eval.max_new_tokens=2",
)


def fixed_inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    """Seeded token ids with the second row right-padded."""
    ids = torch.randint(4, vocab_size, FIXED_SHAPE, generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model: torch.nn.Module) -> torch.Tensor:
    """Float32 logits on :func:`fixed_inputs` (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        return model(**fixed_inputs(vocab)).logits.float()
    finally:
        model.train(was)


@dataclass(frozen=True)
class Federation:
    run_dir: Path
    logits: dict[str, torch.Tensor]
    """Each client's final-evaluation model's logits on the fixed inputs."""


@pytest.fixture(scope="session")
def export_base(tmp_path_factory) -> Path:
    """A random OLMoE of the micro recipe's shape, with the built-in tokenizer (no pretraining).

    Its routers get large random rows, so that routing is far from uniform and FedMoE's measured
    activation keeps different expert counts per layer.
    """
    from fedexperts.data.expertbench import ExpertBench
    from fedexperts.models.builtin import RECIPES, build_tokenizer
    from fedexperts.models.builtin.pretraining import build_model
    from fedexperts.moe import moe_layers

    recipe = RECIPES["micro"]
    tokenizer = build_tokenizer(ExpertBench.from_seed(recipe.world_seed), recipe)
    folder = tmp_path_factory.mktemp("export-base") / "olmoe"
    model = build_model(recipe, tokenizer)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.family.router_weight(layer.router).normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def base_logits(export_base) -> torch.Tensor:
    import transformers

    return logits_of(transformers.AutoModelForCausalLM.from_pretrained(export_base, dtype=torch.float32))


@pytest.fixture(scope="session")
def federation(export_base, tmp_path_factory):
    """``federation(variant)``: the run of a :data:`VARIANTS` entry, run once per session."""
    from fedexperts.experiment import build_setting
    from fedexperts.federation.inprocess import run_experiment
    from tests.federation.helpers import cheap_config

    done: dict[str, Federation] = {}
    runs = tmp_path_factory.mktemp("export-runs")

    def run(variant: str) -> Federation:
        if variant not in done:
            config = cheap_config(export_base, runs, *RUN, *VARIANTS[variant])
            setting = build_setting(config)
            captured: dict[str, torch.Tensor] = {}
            original = setting.algorithm.setup_client

            def spy(model, received, personal, data):
                context = original(model, received, personal, data)
                if data.round == config.federation.rounds + 1 and not context.idle:
                    captured[data.client.client_id] = logits_of(context.model)
                return context

            setting.algorithm.setup_client = spy  # type: ignore[method-assign]
            run_experiment(config, runs / variant, setting=setting)
            done[variant] = Federation(runs / variant, captured)
        return done[variant]

    return run

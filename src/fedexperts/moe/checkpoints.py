"""How checkpoints name each family's tensors, where that differs from the model's own names.

transformers v5 holds routed experts as fused 3-D tensors, but checkpoints on the hub (and what
``save_pretrained`` writes) keep one tensor per expert and projection, sometimes under older
module names; ``from_pretrained`` renames and fuses them with its conversion mapping
(``transformers/conversion_mapping.py``). A :class:`CheckpointNaming` restates that mapping for
one family, so that :func:`fedexperts.models.load_sub_moe` can read and fuse the rows of the
experts a client holds, and nothing else. A checkpoint may also hold the fused tensors under the
model's own names (:func:`fedexperts.moe.save_pruned` and plain ``safetensors`` saves do); both
are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedexperts.errors import UnsupportedModelError
from fedexperts.moe.families import described_family, family_for
from fedexperts.moe.wrappers import builds_whole_wrapper

_GATE_UP_DOWN = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}
_W1_W3_W2 = {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)}
_GRANITE_RENAMES = (
    (r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
    (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj"),
    (r"block_sparse_moe\.router\.layer\.weight$", "block_sparse_moe.router.weight"),
)


@dataclass(frozen=True)
class CheckpointNaming:
    """One family's checkpoint names, as transformers' conversion mapping reads them."""

    renames: tuple[tuple[str, str], ...] = ()
    """``(pattern, replacement)`` regular expressions taking a checkpoint name to the model's name, in order."""
    per_expert: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Fused expert tensor (relative to the experts module) -> the per-expert tensors (relative to
    ``experts.<index>``) whose rows, concatenated in this order, make one expert's row of it."""

    def model_name(self, checkpoint_name: str) -> str:
        """The model's name for a tensor stored as ``checkpoint_name``."""
        for pattern, replacement in self.renames:
            checkpoint_name = re.sub(pattern, replacement, checkpoint_name)
        return checkpoint_name


CHECKPOINT_NAMING: dict[str, CheckpointNaming] = {
    "qwen2_moe": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "qwen3_moe": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "olmoe": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "deepseek_v2": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "deepseek_v3": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "mixtral": CheckpointNaming(renames=((r"\.block_sparse_moe\.", ".mlp."),), per_expert=_W1_W3_W2),
    "phimoe": CheckpointNaming(
        renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
        per_expert=_W1_W3_W2,
    ),
    "granitemoe": CheckpointNaming(renames=_GRANITE_RENAMES),
    "granitemoeshared": CheckpointNaming(renames=_GRANITE_RENAMES),
    "granitemoehybrid": CheckpointNaming(renames=_GRANITE_RENAMES),
    "gpt_oss": CheckpointNaming(),
    "qwen3_next": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "qwen3_5_moe_text": CheckpointNaming(
        # Qwen3.5 checkpoints are the composite model's: the text model sits under ``model.language_model``.
        renames=((r"^model\.language_model\.", "model."),),
        per_expert=_GATE_UP_DOWN,
    ),
    "flex_olmo": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "jamba": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "lfm2_moe": CheckpointNaming(per_expert=_W1_W3_W2),
    "glm4_moe": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "glm4_moe_lite": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "deepseek_v32": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "dots1": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "hunyuan_v1_moe": CheckpointNaming(per_expert=_GATE_UP_DOWN),
    "ernie4_5_moe": CheckpointNaming(
        renames=((r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics."),), per_expert=_GATE_UP_DOWN
    ),
    "minimax": CheckpointNaming(renames=((r"\.block_sparse_moe\.", ".mlp."),), per_expert=_W1_W3_W2),
    "minimax_m2": CheckpointNaming(renames=((r"\.block_sparse_moe\.", ".mlp."),), per_expert=_W1_W3_W2),
    "llama4_text": CheckpointNaming(),  # Llama 4 checkpoints already hold the fused tensors under the model's names
    # One module per expert, stored under the model's own names (``experts.expert_{j}.wi.weight``): the loader
    # reads a kept expert's module under its global index (:func:`fedexperts.models.load_sub_moe`).
    "switch_transformers": CheckpointNaming(),
}
"""Every described family whose sub-MoE can be read straight from its checkpoint."""


def checkpoint_naming(model_or_config: object) -> CheckpointNaming:
    """The naming of a model's (or config's) family, or a clear error for a family that has none."""
    config = getattr(model_or_config, "config", model_or_config)
    if described_family(config) is None:
        raise UnsupportedModelError(
            f"model_type {getattr(config, 'model_type', None)!r} has no descriptor, so no checkpoint naming: a "
            "structurally discovered family is loaded whole, not as a sub-MoE straight from its checkpoint"
        )
    if builds_whole_wrapper(config):
        raise UnsupportedModelError(
            f"{getattr(config, 'model_type', None)} is a wrapper config built whole (vision tower included): its "
            "checkpoint names the text model's tensors its own way; loading a sub-MoE straight from it is not "
            "supported, load the model whole"
        )
    family = family_for(model_or_config)
    naming = CHECKPOINT_NAMING.get(family.model_type)
    if naming is None:
        raise UnsupportedModelError(
            f"{family.display_name} ({family.model_type}) has no checkpoint naming; loading a sub-MoE from its "
            f"checkpoint is supported for: {', '.join(sorted(CHECKPOINT_NAMING))}"
        )
    return naming

"""How one Hugging Face MoE family is described: layouts, routing decisions, sparse blocks.

transformers v5 stores routed experts as fused 3-D tensors (one leading row per expert) behind a
router module that returns ``(logits, top-k weights, top-k indices)``; Switch Transformers still
keeps one module per expert and a top-1 router with expert capacity. A :class:`MoEFamily` is the
explicit description of one ``model_type``: which layers are sparse (from the config, checked
against the modules), the attribute names of router, experts and shared experts, the tensors that
carry one row per expert, and how to read the router's own output. Nothing here is guessed from
substrings of parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import UnsupportedModelError
from fedexperts.moe.wrappers import text_config_of, text_model_path


class ExpertLayout(StrEnum):
    """How one expert's weights are stored."""

    FUSED = "fused"
    """``gate_up_proj`` (E, 2I, H) as ``[gate; up]`` and ``down_proj`` (E, H, I), ``nn.Linear`` orientation."""
    FUSED_TRANSPOSED_INTERLEAVED = "fused-transposed-interleaved"
    """GPT-OSS: ``gate_up_proj`` (E, H, 2I) with gate/up interleaved by column, ``down_proj`` (E, I, H), biases."""
    FUSED_TRANSPOSED = "fused-transposed"
    """Llama 4: ``gate_up_proj`` (E, H, 2I) as ``[gate | up]`` by column and ``down_proj`` (E, I, H), no biases."""
    MODULE_PER_EXPERT = "module-per-expert"
    """Switch Transformers: an ``nn.ModuleDict`` of ``expert_{i}`` dense MLPs."""


class RouterOutput(StrEnum):
    """What a router module returns."""

    LOGITS_WEIGHTS_INDICES = "logits, weights, indices"
    """transformers v5's usual ``(logits (T, E), top-k weights (T, k), top-k indices (T, k))``."""
    SCORES_LOGITS = "scores, logits"
    """Llama 4: ``(scores (T, E), logits (T, E))``, the scores the sigmoid of the top-k logits and 0 elsewhere."""


@dataclass(frozen=True)
class RoutingDecision:
    """What a router chose for each token (flattened batch x sequence order).

    ``indices`` is (T, k) with -1 where no expert was chosen (Switch drops tokens past capacity);
    ``weights`` is (T, k), the weight each chosen expert's output is scaled by.
    """

    indices: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class MoELayer:
    """One sparse block of a model, resolved to its modules."""

    name: str
    """Module path of the sparse block (the model's own naming), e.g. ``model.layers.3.mlp``."""
    stack: str
    """``decoder`` for decoder-only models; ``encoder`` or ``decoder`` for Switch Transformers."""
    layer_index: int
    """Index of the transformer layer in its stack (dense layers count)."""
    # transformers modules carry family-specific attributes (``router.top_k``, ``experts.num_experts``,
    # ``router.num_group``) that ``nn.Module``'s typing cannot describe, so they are typed ``Any``.
    block: Any
    router: Any
    experts: Any
    shared_experts: tuple[nn.Module, ...]
    family: MoEFamily

    @property
    def router_name(self) -> str:
        return f"{self.name}.{self.family.router_attr}"

    @property
    def experts_name(self) -> str:
        return f"{self.name}.{self.family.experts_attr}"

    def expert_row_names(self) -> list[str]:
        """Full names of the router-side tensors with one row per expert (router rows, biases, block buffers)."""
        family = self.family
        return [f"{self.router_name}.{tensor}" for tensor in family.router_expert_tensors] + [
            f"{self.name}.{tensor}" for tensor in family.block_expert_tensors
        ]

    def expert_column_names(self) -> list[str]:
        """Full names of the router tensors whose last axis is per expert (:attr:`MoEFamily.expert_columns`)."""
        return [f"{self.router_name}.{tensor}" for tensor in self.family.expert_columns]

    @property
    def num_experts(self) -> int:
        """Number of experts the block holds now (after any pruning)."""
        return int(self.family.router_weight(self.router).shape[0])

    @property
    def top_k(self) -> int:
        return self.family.router_top_k(self.router)


def decoder_stacks(model: nn.Module, model_type: str) -> list[tuple[str, str, nn.ModuleList]]:
    """The decoder ``layers`` of a decoder-only model: of its text decoder when it is a composite (multimodal) one."""
    base_prefix = getattr(model, "base_model_prefix", "model")
    text = text_model_path(model)
    owners = [(text, model.get_submodule(text))] if text is not None else []
    # Llama4ForCausalLM declares base_model_prefix "language_model" but holds its base model as ``model``
    candidates = [(prefix, getattr(model, prefix, None)) for prefix in dict.fromkeys((base_prefix, "model"))]
    for prefix, owner in (*owners, *candidates, ("", model)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return [("decoder", f"{prefix}.layers".lstrip("."), layers)]
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__} (model_type {model_type!r})")


def _all_layers(config: Any, stack: str, num_layers: int) -> list[int]:
    return list(range(num_layers))


def _attribute(module: Any, dotted: str) -> Any:
    """``module.a.b`` for ``"a.b"``, or ``None`` where a step is missing (a layer without that part)."""
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class MoEFamily:
    """Description of one MoE ``model_type`` in transformers v5 (decoder-only, fused experts)."""

    model_type: str
    display_name: str
    num_experts_field: str
    """Config field that holds the routed expert count."""
    top_k_field: str | None
    """Config field that holds top-k (``None``: fixed top-1)."""
    block_attr: str
    """Attribute of a decoder layer that holds the sparse block."""
    router_attr: str
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    router_expert_tensors: tuple[str, ...] = ("weight",)
    """Router parameters/buffers with one row per expert (relative to the router module)."""
    block_expert_tensors: tuple[str, ...] = ()
    """Tensors with one row per expert held by the sparse block itself, not its router (relative to the
    block): MiniMax-M2 keeps its routing-correction bias there and passes it to the router."""
    expert_columns: tuple[str, ...] = ()
    """Router tensors whose *last* axis is per expert (relative to the router): ERNIE 4.5's (1, E)
    correction bias. Pruning slices them; FedMoE, which moves expert rows, refuses a model with one."""
    router_bias: str | None = None
    """Router bias with one entry per expert, if the router has one (relative to the router)."""
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    """Expert parameters with one leading row per expert (relative to the experts module)."""
    layout: ExpertLayout = ExpertLayout.FUSED
    router_output: RouterOutput = RouterOutput.LOGITS_WEIGHTS_INDICES
    routing: str = "softmax over all experts, top-k"
    """How the router chooses, in words (for docs and error messages)."""
    masking_identity: bool = True
    """Whether pruning equals the full model with dropped experts' logits set to -inf."""
    sparse_layers: Callable[[Any, str, int], list[int]] = field(default=_all_layers)
    group_routing: bool = False
    """DeepSeek's group-limited routing (``n_group`` / ``topk_group``)."""
    layer_shared_expert_attrs: tuple[str, ...] = ()
    """Shared experts that the decoder layer holds beside the sparse block (Granite's ``shared_mlp``)."""
    attention_attrs: tuple[str, ...] = ("self_attn",)
    """Attributes of a decoder layer that may hold its token mixer: attention and, in hybrid models,
    linear attention, Mamba or a short convolution. Each layer has those it has (``None`` or absent
    is skipped); their ``nn.Linear`` projections are where attention LoRA goes."""
    lora_excluded: tuple[str, ...] = ()
    """Token-mixer linears (paths relative to the layer) whose weight a fused kernel reads directly,
    bypassing the module's forward: a LoRA adapter there would be skipped without a word, so none is put."""
    group_scored_by: int = 1
    """How many of a group's best experts score the group (DeepSeek-V2: its best one; V3 and its
    descendants: the sum of the top 2), so a pruned group must keep at least that many."""
    experts_interface: bool = True
    """Whether the experts module is transformers' standard one (``@use_experts_implementation``: called as
    ``experts(hidden, top_k_index, top_k_weights)``, layout flags on the module). Llama 4's is not: it runs
    every expert on copies of the tokens pre-scaled by their router scores."""
    attention_skip: tuple[str, ...] = ()
    """Children of an attention module that attention LoRA leaves alone (DeepSeek-V3.2's DSA indexer runs
    under ``torch.no_grad``, so adapters there would never train)."""
    expert_capacity: str | None = None
    """The router attribute (and config field) of a per-expert token capacity (Switch's ``expert_capacity``:
    per sequence, tokens past it are dropped). Pruning to ``n`` of ``E`` experts scales it by ``E / n``,
    so the kept experts have as many slots in all as the full layer: the capacity factor is kept."""

    # -- model structure -------------------------------------------------------------------------
    def stacks(self, model: PreTrainedModel) -> list[tuple[str, str, nn.ModuleList]]:
        """``(stack name, module path prefix, layers)`` for each layer stack of the model."""
        return decoder_stacks(model, self.model_type)

    def num_layers(self, config: Any, stack: str) -> int:
        return int(text_config_of(config).num_hidden_layers)

    def block_in_layer(self, layer: Any) -> tuple[str, nn.Module | None]:
        """Relative path and module of the sparse block inside one transformer layer."""
        return self.block_attr, getattr(layer, self.block_attr, None)

    def attention_modules(self, layer: Any) -> list[nn.Module]:
        """The token mixers (``attention_attrs``) this transformer layer has."""
        found = (_attribute(layer, attr) for attr in self.attention_attrs)
        return [module for module in found if isinstance(module, nn.Module)]

    def lora_excluded_modules(self, layer: Any) -> list[nn.Module]:
        """The linears of this layer that attention LoRA must leave alone (``lora_excluded``)."""
        found = (_attribute(layer, path) for path in self.lora_excluded)
        return [module for module in found if isinstance(module, nn.Module)]

    def shared_experts_of(self, layer: Any, block: Any) -> tuple[nn.Module, ...]:
        """Shared experts of one sparse block: the block's own, then the layer's beside it."""
        held = [getattr(block, attr, None) for attr in self.shared_expert_attrs]
        held += [getattr(layer, attr, None) for attr in self.layer_shared_expert_attrs]
        return tuple(module for module in held if isinstance(module, nn.Module))

    def is_sparse_block(self, block: Any) -> bool:
        return (
            block is not None
            and isinstance(getattr(block, self.router_attr, None), nn.Module)
            and isinstance(getattr(block, self.experts_attr, None), nn.Module)
        )

    # -- router ----------------------------------------------------------------------------------
    def router_weight(self, router: Any) -> torch.Tensor:
        weight = router.get_parameter(self.router_expert_tensors[0])
        return weight

    def router_top_k(self, router: Any) -> int:
        return int(router.top_k)

    def router_logits(self, router_output: Any) -> torch.Tensor:
        """The router's logits (T, E), with their autograd graph."""
        if self.router_output is RouterOutput.SCORES_LOGITS:
            return router_output[1]
        return router_output[0]

    def router_bias_of(self, router: Any) -> torch.Tensor | None:
        """The router's per-expert bias, or ``None`` when it has none."""
        if self.router_bias is None:
            return None
        owner_path, _, leaf = self.router_bias.rpartition(".")
        owner = router.get_submodule(owner_path) if owner_path else router
        bias = getattr(owner, leaf, None)
        return bias if isinstance(bias, torch.Tensor) else None

    def decisions(self, router_output: Any, router: Any) -> RoutingDecision:
        """Read the router's own output (:class:`RouterOutput`) as the chosen experts and their weights."""
        if self.router_output is RouterOutput.SCORES_LOGITS:
            # the router chose torch.topk of these very logits; the same call on the same tensor gives its choice
            scores, logits = router_output
            indices = logits.topk(self.router_top_k(router), dim=-1).indices
            return RoutingDecision(indices=indices, weights=scores.gather(1, indices))
        _, weights, indices = router_output
        return RoutingDecision(indices=indices.reshape(indices.shape[0], -1), weights=weights)

    def block_output(self, output: Any) -> torch.Tensor:
        """The hidden-state output of a sparse block (GPT-OSS also returns router scores)."""
        return output[0] if isinstance(output, tuple) else output

    def config_num_experts(self, config: Any) -> int:
        return int(getattr(text_config_of(config), self.num_experts_field))

    def config_top_k(self, config: Any) -> int:
        return 1 if self.top_k_field is None else int(getattr(text_config_of(config), self.top_k_field))


@dataclass(frozen=True)
class DiscoveredFamily(MoEFamily):
    """A family found from the live modules and confirmed on a forward (:mod:`fedexperts.moe.discovery`)."""

    confirmed_on: str = ""
    """Where the identity checks ran (the model's own weights, or a random-weight copy of one block)."""

    def attention_modules(self, layer: Any) -> list[nn.Module]:
        """Each layer's ``self_attn`` (transformers' name for it); layers without one get no attention LoRA."""
        attention = getattr(layer, "self_attn", None)
        return [attention] if isinstance(attention, nn.Module) else []


@dataclass(frozen=True)
class SwitchFamily(MoEFamily):
    """Switch Transformers: encoder-decoder, one module per expert, top-1 routing with capacity."""

    def stacks(self, model: PreTrainedModel) -> list[tuple[str, str, nn.ModuleList]]:
        found = []
        for stack in ("encoder", "decoder"):
            blocks = getattr(getattr(model, stack, None), "block", None)
            if isinstance(blocks, nn.ModuleList):
                found.append((stack, f"{stack}.block", blocks))
        if not found:
            raise UnsupportedModelError(f"cannot find the encoder/decoder blocks of {type(model).__name__}")
        return found

    def num_layers(self, config: Any, stack: str) -> int:
        if stack == "decoder":
            return int(config.num_decoder_layers)
        return int(config.num_layers)

    def block_in_layer(self, layer: Any) -> tuple[str, nn.Module | None]:
        feed_forward_index = len(layer.layer) - 1
        feed_forward = layer.layer[feed_forward_index]
        return f"layer.{feed_forward_index}.mlp", getattr(feed_forward, "mlp", None)

    def attention_modules(self, layer: Any) -> list[nn.Module]:
        """Self-attention (and, in the decoder, cross-attention) sublayers of a Switch block."""
        return list(layer.layer)[:-1]

    def router_weight(self, router: Any) -> torch.Tensor:
        return router.classifier.weight

    def router_top_k(self, router: Any) -> int:
        return 1

    def router_logits(self, router_output: Any) -> torch.Tensor:
        return router_output[2]

    def decisions(self, router_output: Any, router: Any) -> RoutingDecision:
        """Switch returns ``(one-hot dispatch mask, max probability, logits)``; dropped tokens have no expert."""
        dispatch, probs, _ = router_output
        dispatch = dispatch.reshape(-1, dispatch.shape[-1])
        chosen = dispatch.any(dim=-1)
        indices = torch.where(chosen, dispatch.argmax(dim=-1), torch.full_like(chosen, -1, dtype=torch.long))
        weights = probs.reshape(-1, 1) * chosen.unsqueeze(-1)
        return RoutingDecision(indices=indices.unsqueeze(-1), weights=weights)

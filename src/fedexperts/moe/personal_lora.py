"""LoRA on grafted personal experts held as fused tensors (FLEx's ``personal_training="lora"``).

FLEx's official code trains the grafted ("side") expert and its gate through peft LoRA on their
``nn.Linear`` projections, with the pretrained copy frozen underneath. fedexperts puts peft's own
LoRA layers wherever the graft is made of ``nn.Linear`` modules (the personal gate, and the personal
experts of families with a module per expert). Most families' experts, and so their grafted copies,
are *fused* 3-D tensors (``gate_up_proj``: one matrix per expert) run by the family's experts class,
not ``nn.Linear`` modules, so peft's ``Linear`` LoRA layers do not apply; peft's ``target_parameters``
wrapper (``ParamWrapper``) does take 3-D tensors but refuses any ``lora_dropout`` (it merges the delta
into the weight), while the official code uses dropout 0.05. So this module holds a minimal low-rank
delta per fused tensor: for expert ``e``, ``A_e`` (r x in, peft's Kaiming-uniform init) and ``B_e``
(out x r, zero-init), and the personal expert's projection becomes ``W_e x + (alpha / r) B_e A_e drop(x)``,
computed on the input side (so dropout applies as in peft). A fused ``gate_up_proj`` gets one rank-r
delta over its fused output, where the official code has separate rank-r adapters on ``gate_proj``
and ``up_proj``.

The module declares ``adapter_layer_names`` like a peft tuner layer, so
:func:`fedexperts.moe.params.parameter_kinds` reports its tensors as adapters of the personal expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedexperts.moe.experts import FusedMath, apply_gate, dense_projection

PERSONAL_LORA = "personal_lora"
PERSONAL_ADAPTER = "default"
"""peft adapter name of the LoRA on the personal gate (and module-per-expert personal experts): peft's
default, the same as the attention LoRA's, because a later ``inject_adapter_in_model`` makes its own
adapter name the active one on every LoRA layer of the model (another name would silently turn the
personal adapters off). Which tensors are personal is decided by the module they sit on, not the name."""


class FusedExpertLora(nn.Module):
    """Low-rank deltas on the 3-D weights of a grafted experts module, and the forward that uses them."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(
        self, experts: nn.Module, tensors: tuple[str, ...], fused: FusedMath, rank: int, alpha: int, dropout: float
    ) -> None:
        super().__init__()
        self.transposed = fused.transposed
        self.has_bias = fused.has_bias
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in tensors:
            weight = experts.get_parameter(name)
            if weight.dim() != 3:
                continue  # biases stay frozen, as peft's bias="none"
            count, rows, cols = weight.shape
            inputs, outputs = (rows, cols) if self.transposed else (cols, rows)
            device = weight.device
            self.lora_A[name] = nn.Parameter(torch.empty(count, rank, inputs, device=device, dtype=torch.float32))
            self.lora_B[name] = nn.Parameter(torch.empty(count, outputs, rank, device=device, dtype=torch.float32))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh adapters: ``A`` Kaiming-uniform (peft's init), ``B`` zero, so the delta starts at zero."""
        for a in self.lora_A.values():
            for row in a:
                nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        for b in self.lora_B.values():
            b.zero_()

    @torch.no_grad()
    def merge_into(self, experts: nn.Module) -> None:
        """Add the deltas to the experts' own weights (``W_e + (alpha / r) B_e A_e`` in their layout).

        The merged experts alone then compute what they computed with this module (up to rounding).
        """
        for name, a in self.lora_A.items():
            weight = experts.get_parameter(name)
            delta = self.scaling * torch.matmul(self.lora_B[name], a)  # (E, out, in)
            weight.add_((delta.transpose(1, 2) if self.transposed else delta).to(weight.dtype))

    def _project(self, experts: nn.Module, hidden: torch.Tensor, name: str) -> torch.Tensor:
        weight = experts.get_parameter(name)
        bias = experts.get_parameter(f"{name}_bias") if self.has_bias else None
        out = dense_projection(hidden, weight, bias, self.transposed)
        a = self.lora_A[name].to(hidden.dtype).transpose(1, 2)
        b = self.lora_B[name].to(hidden.dtype).transpose(1, 2)
        return out + self.scaling * torch.matmul(torch.matmul(self.dropout(hidden), a), b)

    def forward(self, experts: nn.Module, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e weights[:, e] * expert_e(hidden)`` with the deltas applied; ``hidden`` (T, H), ``weights`` (T, n)."""
        gate_up = self._project(experts, hidden, "gate_up_proj")
        activated = apply_gate(experts, gate_up)
        out = self._project(experts, activated, "down_proj")  # (n, T, H)
        return (out * weights.transpose(0, 1).unsqueeze(-1).to(out.dtype)).sum(dim=0)

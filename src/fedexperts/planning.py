"""Size a federation before anything is downloaded: parameters by role, bytes per round, client memory.

The model is built from its config alone on PyTorch's ``meta`` device (shapes and dtypes, no
storage), then the algorithm does exactly what it does on a real model: ``prepare`` injects peft's
LoRA in place and assigns roles, ``initial_global_state`` / ``downlink`` / ``setup_client`` /
``uplink`` / ``personal_state`` produce the round's payloads. Nothing here knows an algorithm's
name: FLEx, FedMoE or any later algorithm is planned through the same interface.

Why this works on ``meta``: every step above only creates, slices, clones or copies tensors,
which meta tensors support; peft creates the LoRA layers in the default dtype and then moves them
to the base layer's device and dtype (``_move_adapter_to_device_of_base_layer``), so the adapters
land on ``meta`` in the base dtype, exactly as they land on the CPU or GPU for a loaded model.
Meta tensors cannot be serialised, so the wire size is computed by :func:`encoded_size`, which
reproduces safetensors' byte layout (tested byte for byte against
:func:`fedexperts.federation.payload.encode`). An algorithm whose payload depends on tensor
*values* (not shapes) could not be planned this way; the ones registered today do not.

Presets are the architecture fields of each checkpoint's ``config.json`` on the Hugging Face hub.
Planning sizes transformers' own implementation of the ``model_type``: ``auto_map`` (remote code)
is never run, and ``quantization_config`` is dropped, so e.g. gpt-oss is sized dequantized in the
chosen dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.table import Table
from torch import nn

from fedexperts.algorithms.base import ClientInfo
from fedexperts.algorithms.registry import build_algorithm
from fedexperts.config import AlgorithmConfig
from fedexperts.errors import FedExpertsError, UnsupportedModelError
from fedexperts.federation.payload import _METADATA_KEY, Payload, PayloadError, metadata_json
from fedexperts.moe.families import family_for, moe_layers, supported_model_types, unwrap_model
from fedexperts.moe.params import Role, parameter_kinds


class PlanError(FedExpertsError):
    """A model to plan that is neither a preset nor a readable config of a supported MoE."""


_GPT_OSS_LAYER_TYPES = ["sliding_attention", "full_attention"] * 12

PRESETS: dict[str, dict[str, Any]] = {
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "vocab_size": 50304,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "clip_qkv": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "pad_token_id": 1,
        "eos_token_id": 50279,
        "router_aux_loss_coef": 0.01,
    },
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
        "vocab_size": 151936,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "router_aux_loss_coef": 0.001,
    },
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "router_aux_loss_coef": 0.001,
    },
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "router_aux_loss_coef": 0.02,
    },
    # deepseek-ai/DeepSeek-V2-Lite (its config.json also has an auto_map to remote code, not needed here)
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "vocab_size": 102400,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    # openai/gpt-oss-20b (experts stored as MXFP4 on the hub; sized here dequantized, in the chosen dtype)
    "gpt-oss-20b": {
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "sliding_window": 128,
        "layer_types": _GPT_OSS_LAYER_TYPES,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        "attention_bias": True,
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "router_aux_loss_coef": 0.9,
    },
}
"""Architecture fields of real checkpoints' ``config.json`` (transformers config kwargs), by short name.

Taken from the hub checkpoints ``allenai/OLMoE-1B-7B-0924``, ``Qwen/Qwen1.5-MoE-A2.7B``,
``Qwen/Qwen3-30B-A3B``, ``mistralai/Mixtral-8x7B-v0.1``, ``deepseek-ai/DeepSeek-V2-Lite`` and
``openai/gpt-oss-20b`` (see :data:`PRESET_SOURCES`); fields that do not change a tensor's shape
(dropout, init range, cache) are left at transformers' defaults.
"""

PRESET_SOURCES: dict[str, str] = {
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "gpt-oss-20b": "openai/gpt-oss-20b",
}
"""The hub checkpoint each preset's config was taken from."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# safetensors' dtype names, in the order of its ``Dtype`` enum: ``serialize`` lays tensors out by
# descending rank, then by name, and the data offsets in the header follow that order.
_SAFETENSORS_ORDER = (
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, name): code for name, code in _SAFETENSORS_ORDER if hasattr(torch, name)
}  # a dtype this torch lacks (older releases) simply cannot occur
_SAFETENSORS_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}

TensorSpec = tuple[tuple[int, ...], torch.dtype]


# -- wire size -------------------------------------------------------------------------------------
def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _wire_dtype(dtype: torch.dtype, transfer_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``encode`` writes: floating tensors are cast to ``transfer_dtype`` when one is given."""
    return transfer_dtype if transfer_dtype is not None and dtype.is_floating_point else dtype


def encoded_header(
    shapes_and_dtypes: Mapping[str, TensorSpec], metadata: dict[str, Any], *, dtype: torch.dtype | None = None
) -> bytes:
    """The padded JSON header :func:`~fedexperts.federation.payload.encode` writes for these tensors.

    Same layout as safetensors' ``serialize``: tensors sorted by descending dtype rank then name,
    consecutive data offsets, ``__metadata__`` first, compact JSON with raw UTF-8, padded with
    spaces to a multiple of 8 bytes.
    """
    entries = []
    cast = {}
    for name, (shape, stored) in shapes_and_dtypes.items():
        wire = _wire_dtype(stored, dtype)
        if wire not in _SAFETENSORS_DTYPES:
            raise PayloadError(f"{name}: safetensors cannot store dtype {wire}")
        if wire != stored:
            cast[name] = str(stored).removeprefix("torch.")
        entries.append((name, tuple(int(size) for size in shape), wire))
    entries.sort(key=lambda entry: (-_SAFETENSORS_RANK[entry[2]], entry[0]))
    header: dict[str, Any] = {"__metadata__": {_METADATA_KEY: metadata_json(metadata, cast)}}
    offset = 0
    for name, shape, wire in entries:
        end = offset + _numel(shape) * wire.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[wire], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def encoded_size(
    shapes_and_dtypes: Mapping[str, TensorSpec], metadata: dict[str, Any], *, dtype: torch.dtype | None = None
) -> int:
    """``len(encode(Payload(tensors, metadata), dtype=dtype))`` from shapes and dtypes alone.

    8-byte header length, the padded JSON header, then every tensor's bytes; works for tensors
    that have no storage (``meta``), which ``encode`` itself cannot serialise.
    """
    data = sum(_numel(shape) * _wire_dtype(stored, dtype).itemsize for shape, stored in shapes_and_dtypes.values())
    return 8 + len(encoded_header(shapes_and_dtypes, metadata, dtype=dtype)) + data


def payload_size(payload: Payload, *, dtype: torch.dtype | None = None) -> int:
    """Exact encoded size of ``payload`` (its tensors may live on ``meta``)."""
    specs = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in payload.tensors.items()}
    return encoded_size(specs, payload.metadata, dtype=dtype)


# -- model from a config ---------------------------------------------------------------------------
def _presets_hint() -> str:
    return "presets: " + ", ".join(PRESETS)


def resolve_dtype(dtype: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a name such as ``bfloat16`` (or ``bf16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PlanError(f"unknown {what} {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_plan_config(source: str | Path) -> tuple[str, transformers.PretrainedConfig]:
    """``(display name, config)`` for a preset name, a ``config.json``, or a folder holding one."""
    text = str(source)
    if isinstance(source, str) and source in PRESETS:
        return source, _config_from_dict(dict(PRESETS[source]), source)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"{text!r} is not a preset, nor a config.json or a folder holding one; {_presets_hint()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PlanError(f"{path}: not a readable JSON config ({error}); {_presets_hint()}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PlanError(f"{path}: a model config.json needs a model_type; {_presets_hint()}")
    return text, _config_from_dict(data, text)


def _config_from_dict(data: dict[str, Any], source: str) -> transformers.PretrainedConfig:
    fields = {key: value for key, value in data.items() if key not in ("auto_map", "quantization_config")}
    model_type = fields.pop("model_type")
    if model_type not in supported_model_types():
        raise PlanError(
            f"{source}: model_type {model_type!r} is not a supported MoE family "
            f"(supported: {', '.join(supported_model_types())}); {_presets_hint()}"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as error:
        raise PlanError(f"{source}: invalid {model_type} config: {error}") from None


def meta_model(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` on the ``meta`` device: every parameter's shape and dtype, no storage."""
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        model: nn.Module = auto.from_config(config, dtype=dtype)
    return model


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KindCount:
    """Parameters of one kind (LoRA adapters of a kind counted apart), split by role."""

    kind: str
    adapter: bool
    params: int
    by_role: Mapping[Role, int]

    @property
    def label(self) -> str:
        return f"{self.kind} LoRA" if self.adapter else self.kind


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training client holds, activations excluded.

    ``weights``: every parameter and buffer in its own dtype. ``gradients``: one per trainable
    parameter, in its dtype. ``optimizer``: ``torch.optim.AdamW`` as :mod:`fedexperts.training`
    uses it, ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype plus a 4-byte step per tensor;
    no fp32 master copy exists because training keeps weights in their dtype (bf16 is autocast).
    """

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class Plan:
    """What one client of a federation holds, trains and sends, computed from the config alone."""

    model: str
    model_type: str
    family: str
    algorithm: str
    dtype: torch.dtype
    transfer_dtype: torch.dtype | None
    moe_layers: int
    num_experts: int
    top_k: int
    base_params: int
    """The checkpoint's parameters (before any adapter)."""
    active_params: int
    """Base parameters one token passes through: routed experts count ``top_k / num_experts``."""
    total_params: int
    """After ``prepare`` (LoRA adapters included)."""
    trainable_params: int
    by_role: Mapping[Role, int]
    by_kind: tuple[KindCount, ...]
    downlink_bytes: int
    uplink_bytes: int
    downlink_tensors: int
    uplink_tensors: int
    personal_bytes: int
    """Encoded size of the state a client keeps between rounds (not sent)."""
    memory: MemoryEstimate


def _active_params(model: nn.Module, base_params: int) -> int:
    inactive = 0.0
    for layer in moe_layers(unwrap_model(model)):
        routed = sum(parameter.numel() for parameter in layer.experts.parameters())
        inactive += routed * (layer.num_experts - layer.top_k) / layer.num_experts
    return base_params - round(inactive)


def plan(
    config_source: str | Path,
    algorithm_config: AlgorithmConfig,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    transfer_dtype: str | torch.dtype | None = None,
    examples: int = 1000,
) -> Plan:
    """Plan one federation of ``config_source`` (preset, config.json or folder) under an algorithm.

    One client round is played on the meta model: downlink of the initial global state, the
    client set up from it (no personal state yet), uplink and personal state after "training".
    ``examples`` is the client's example count, which the uplink metadata carries.
    """
    weights_dtype = resolve_dtype(dtype)
    wire_dtype = None if transfer_dtype is None else resolve_dtype(transfer_dtype, "transfer dtype")
    name, config = load_plan_config(config_source)
    try:
        family = family_for(config)
        model = meta_model(config, weights_dtype)
    except UnsupportedModelError as error:
        raise PlanError(f"{name}: {error}; {_presets_hint()}") from None
    except (ValueError, TypeError, RuntimeError) as error:  # transformers' checks of the config's values
        raise PlanError(f"{name}: cannot build the model from its config: {error}") from None
    try:
        layers = moe_layers(unwrap_model(model))
    except UnsupportedModelError as error:
        raise PlanError(f"{name}: {error}; {_presets_hint()}") from None
    base_params = sum(parameter.numel() for parameter in model.parameters())
    active_params = _active_params(model, base_params)
    algorithm = build_algorithm(algorithm_config)
    algorithm.prepare(model)
    kinds = parameter_kinds(model)

    client = ClientInfo("client-0", examples)
    received = algorithm.downlink(algorithm.initial_global_state(model), client)
    algorithm.setup_client(model, received, None)
    sent = algorithm.uplink(model, client)
    personal = algorithm.personal_state(model)

    parameters = dict(unwrap_model(model).named_parameters())
    by_role = dict.fromkeys(Role, 0)
    grouped: dict[tuple[str, bool], dict[Role, int]] = {}
    for param_name, parameter in parameters.items():
        role = algorithm.roles[param_name]
        by_role[role] += parameter.numel()
        info = kinds[param_name]
        counts = grouped.setdefault((info.kind.value, info.adapter), dict.fromkeys(Role, 0))
        counts[role] += parameter.numel()
    by_kind = tuple(
        KindCount(kind, adapter, sum(counts.values()), counts)
        for (kind, adapter), counts in sorted(grouped.items(), key=lambda item: -sum(item[1].values()))
    )
    trainable = [parameter for parameter in parameters.values() if parameter.requires_grad]
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in unwrap_model(model).buffers())
    trainable_bytes = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    memory = MemoryEstimate(
        weights=sum(parameter.numel() * parameter.element_size() for parameter in parameters.values()) + buffers,
        gradients=trainable_bytes,
        optimizer=2 * trainable_bytes + 4 * len(trainable),
    )
    return Plan(
        model=name,
        model_type=family.model_type,
        family=family.display_name,
        algorithm=algorithm.name,
        dtype=weights_dtype,
        transfer_dtype=wire_dtype,
        moe_layers=len(layers),
        num_experts=layers[0].num_experts,
        top_k=layers[0].top_k,
        base_params=base_params,
        active_params=active_params,
        total_params=sum(parameter.numel() for parameter in parameters.values()),
        trainable_params=sum(parameter.numel() for parameter in trainable),
        by_role=by_role,
        by_kind=by_kind,
        downlink_bytes=payload_size(received, dtype=wire_dtype),
        uplink_bytes=payload_size(sent, dtype=wire_dtype),
        downlink_tensors=len(received.tensors),
        uplink_tensors=len(sent.tensors),
        personal_bytes=0 if personal is None else payload_size(personal),
        memory=memory,
    )


# -- rendering -------------------------------------------------------------------------------------
def human_count(count: int) -> str:
    """``6919161856`` -> ``6.92B``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def human_bytes(size: int) -> str:
    """Binary units: ``8388608`` -> ``8.00 MiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.2f} {unit}"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "as stored" if dtype is None else str(dtype).removeprefix("torch.")


_MEMORY_NOTE = "client memory = weights + gradients + AdamW state; activations are not included"


def plan_table(result: Plan) -> Table:
    """One plan as a table: model, parameters by kind and role, bytes per round, client memory."""
    table = Table(
        title=f"fedexperts plan: {result.model} with {result.algorithm}",
        caption=f"{_MEMORY_NOTE} (they grow with batch size x sequence length)",
    )
    table.add_column("")
    table.add_column("parameters / size", justify="right")
    table.add_column("detail")
    table.add_row(
        "model",
        "",
        f"{result.family} ({result.model_type}), {result.moe_layers} MoE layers x {result.num_experts} experts, "
        f"top-{result.top_k}",
    )
    table.add_row("parameters", human_count(result.base_params), f"{result.base_params:,} (the checkpoint's)")
    table.add_row("active per token", human_count(result.active_params), f"{result.active_params:,}")
    table.add_section()
    for row in result.by_kind:
        roles = ", ".join(f"{role.value} {human_count(count)}" for role, count in row.by_role.items() if count)
        table.add_row(f"  {row.label}", human_count(row.params), roles)
    table.add_section()
    for role in Role:
        table.add_row(role.value, human_count(result.by_role[role]), f"{result.by_role[role]:,}")
    table.add_row("trainable", human_count(result.trainable_params), f"{result.trainable_params:,}")
    table.add_section()
    wire = f"safetensors, transfer dtype {_dtype_name(result.transfer_dtype)}"
    table.add_row(
        "downlink / client / round",
        human_bytes(result.downlink_bytes),
        f"{result.downlink_bytes:,} B, {result.downlink_tensors} tensors ({wire})",
    )
    table.add_row(
        "uplink / client / round",
        human_bytes(result.uplink_bytes),
        f"{result.uplink_bytes:,} B, {result.uplink_tensors} tensors ({wire})",
    )
    table.add_row("personal state kept", human_bytes(result.personal_bytes), f"{result.personal_bytes:,} B")
    table.add_section()
    memory = result.memory
    table.add_row("weights", human_bytes(memory.weights), f"{_dtype_name(result.dtype)} parameters and buffers")
    table.add_row("gradients", human_bytes(memory.gradients), "trainable parameters only")
    table.add_row("AdamW state", human_bytes(memory.optimizer), "exp_avg + exp_avg_sq in the parameters' dtype")
    table.add_row("client memory", human_bytes(memory.total), "activations not included")
    return table


def comparison_table(plans: list[Plan]) -> Table:
    """Several plans side by side, one row each (e.g. every preset under one algorithm)."""
    algorithms = sorted({result.algorithm for result in plans})
    dtypes = sorted({_dtype_name(result.dtype) for result in plans})
    wires = sorted({_dtype_name(result.transfer_dtype) for result in plans})
    table = Table(
        title=f"fedexperts plan: {', '.join(algorithms)}, weights {', '.join(dtypes)}, transfer {', '.join(wires)}",
        caption=_MEMORY_NOTE,
    )
    for column in ("model", "type", "params", "active", "trainable", "shared", "personal"):
        table.add_column(column, justify="left" if column in ("model", "type") else "right")
    for column in ("down/round", "up/round", "client memory"):
        table.add_column(column, justify="right")
    for result in plans:
        table.add_row(
            result.model,
            result.model_type,
            human_count(result.base_params),
            human_count(result.active_params),
            human_count(result.trainable_params),
            human_count(result.by_role[Role.SHARED]),
            human_count(result.by_role[Role.PERSONAL]),
            human_bytes(result.downlink_bytes),
            human_bytes(result.uplink_bytes),
            human_bytes(result.memory.total),
        )
    return table

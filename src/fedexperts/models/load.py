"""Load a model and its tokenizer from a hub name or a local folder, and check it is a supported MoE.

The config is read first, so an unsupported or dense model is refused before any weight is
loaded, with :mod:`fedexperts.moe`'s own message. Code shipped with a checkpoint never runs unless
the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError

from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import MoEFamily, described_family, family_for, moe_layers
from fedexperts.moe.wrappers import is_composite, mark_text_only, wrapper_note

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""What a model folder's tokenizer is read from (any one of them, with ``tokenizer_config.json``)."""


@dataclass(frozen=True)
class LoadedModel:
    model: transformers.PreTrainedModel
    tokenizer: Any
    family: MoEFamily
    source: str


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """A dtype name (``float32``, ``bfloat16``, ``float16``) as a torch dtype; ``auto`` and dtypes as they are."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise FedExpertsError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_class_for(config: Any) -> Any:
    """transformers' auto class that builds a language model of ``config``.

    Seq2seq for an encoder-decoder, else the causal LM (which for some wrapper configs, such as
    ``llama4`` and ``qwen3_5_moe``, is the text model alone), else the image-text-to-text or
    multimodal LM class of a composite config (its text model is what fedexperts trains,
    :mod:`fedexperts.moe.wrappers`).
    """
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    candidates = [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText]
    multimodal = getattr(transformers, "AutoModelForMultimodalLM", None)  # not in every transformers 5.x
    if multimodal is not None:
        candidates.append(multimodal)
    for auto in candidates:
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return auto
    return transformers.AutoModelForCausalLM  # raises transformers' own "unrecognized configuration" error


def refuse_local_remote_code(folder: Path) -> None:
    """A local checkpoint whose config points at its own code (``auto_map``) needs explicit trust."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers reports a missing or broken config itself
    if isinstance(config, dict) and config.get("auto_map"):
        raise FedExpertsError(
            f"{folder} ships its own model code (auto_map in config.json); fedexperts does not run it "
            "unless you pass trust_remote_code=True, and only do that for code you trust"
        )


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The checkpoint's tokenizer, with the EOS token as padding when it has no pad token.

    Refused when empty: transformers builds one with no vocabulary when its files are missing.
    """
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as error:
        raise FedExpertsError(f"cannot load the tokenizer of {source}: {error}") from error
    if not tokenizer("tokenizer check", add_special_tokens=False)["input_ids"]:
        raise FedExpertsError(
            f"{source} has no usable tokenizer: it encodes text to no tokens; the model folder needs the "
            f"tokenizer's files (one of {', '.join(_TOKENIZER_FILES)}, with tokenizer_config.json) copied "
            "from where the model came from"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    experts_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``name_or_path`` (a local folder, else a hub name) as a causal LM MoE with its tokenizer.

    ``experts_implementation`` is transformers' switch for fused experts (``eager``,
    ``grouped_mm``, ``batched_mm``; ``None`` keeps transformers' choice). The tokenizer gets the
    EOS token as padding when it has no pad token (:func:`load_tokenizer`). The model is returned
    in eval mode on ``device``. The config and the tokenizer are checked before any weight is read;
    missing or unreadable weights are a :class:`FedExpertsError` naming the folder.
    """
    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local)
        if not trust_remote_code:
            refuse_local_remote_code(local)
    elif isinstance(name_or_path, Path) or source.startswith(("/", "./", "../", "~")):
        raise FedExpertsError(f"no model folder at {source}")
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **options)
    except ValueError as error:  # includes the hub client's invalid-name error
        if "trust_remote_code" in str(error):
            raise FedExpertsError(
                f"{source} needs its own model code; pass trust_remote_code=True only if you trust it"
            ) from error
        raise FedExpertsError(f"cannot read a model config from {source!r}: {error}") from error
    except OSError as error:
        raise FedExpertsError(
            f"cannot find a model at {source!r} (not a folder here, nor on the hub): {error}"
        ) from error
    model_class = model_class_for(config)
    if described_family(config) is None:  # no descriptor: discovery on the meta model refuses before any weight
        with torch.device("meta"):
            skeleton = model_class.from_config(config)
        family_for(skeleton)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, revision=revision)
    if experts_implementation is not None:
        options["experts_implementation"] = experts_implementation
    try:
        model = model_class.from_pretrained(source, config=config, dtype=resolve_dtype(dtype), **options)
    except ValueError as error:
        raise FedExpertsError(f"cannot load {source}: {error}") from error
    except OSError as error:  # no weight file, or a download that failed
        raise FedExpertsError(f"cannot load the weights of {source}: {error}") from error
    except SafetensorError as error:
        raise FedExpertsError(
            f"cannot read the weights of {source} ({error}): the file is truncated or corrupt; "
            "copy or download it again"
        ) from error
    note_wrapper(model, config)
    movable: Any = model  # transformers types its wrapper of ``nn.Module.to`` in a way mypy cannot call
    movable.to(device).eval()
    family = family_for(model)  # a type without a descriptor is confirmed here again, on its weights
    moe_layers(model)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=source)


def note_wrapper(model: Any, config: Any) -> None:
    """Log what of a wrapper config's model is trained (:func:`~fedexperts.moe.wrappers.wrapper_note`)."""
    if is_composite(config) and not is_composite(model.config):
        mark_text_only(model, config.model_type)
    note = wrapper_note(model)
    if note is not None:
        logger.warning("%s", note)

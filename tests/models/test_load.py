import json

import pytest
import transformers

from fedexperts.errors import FedExpertsError, UnsupportedModelError
from fedexperts.models.load import load_model
from fedexperts.models.tiny import tiny_config, tiny_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from fedexperts.data.expertbench import ExpertBench
    from fedexperts.models.builtin import RECIPES, build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"]).save_pretrained(folder)
    return folder


def save_checkpoint(model, folder, tokenizer_dir):
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_loads_a_local_moe_checkpoint_with_its_tokenizer(tmp_path, tokenizer_dir):
    original = tiny_model("qwen2_moe", seed=3)
    folder = save_checkpoint(original, tmp_path / "qwen", tokenizer_dir)
    loaded = load_model(folder, experts_implementation="eager")
    assert loaded.family.model_type == "qwen2_moe"
    assert loaded.model.config._experts_implementation == "eager"
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token == "<|pad|>"
    for name, tensor in original.state_dict().items():
        assert loaded.model.state_dict()[name].equal(tensor), name


def test_dtype_option_is_applied(tmp_path, tokenizer_dir):
    folder = save_checkpoint(tiny_model("olmoe"), tmp_path / "olmoe", tokenizer_dir)
    import torch

    assert next(load_model(folder, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FedExpertsError, match="unknown dtype 'float8'"):
        load_model(folder, dtype="float8")


def test_refuses_a_dense_model(tmp_path, tokenizer_dir):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
    )
    folder = save_checkpoint(transformers.LlamaForCausalLM(config), tmp_path / "llama", tokenizer_dir)
    with pytest.raises(UnsupportedModelError, match="model_type 'llama' is not a supported MoE family"):
        load_model(folder)


def test_refuses_an_moe_type_configured_without_experts(tmp_path, tokenizer_dir):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", mlp_only_layers=[0, 1, 2]))
    folder = save_checkpoint(model, tmp_path / "dense-qwen", tokenizer_dir)
    with pytest.raises(UnsupportedModelError, match="has no MoE layer"):
        load_model(folder)


def test_refuses_remote_code_unless_asked(tmp_path, tokenizer_dir):
    folder = save_checkpoint(tiny_model("olmoe"), tmp_path / "custom", tokenizer_dir)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FedExpertsError, match=r"ships its own model code.*trust_remote_code=True"):
        load_model(folder)


def test_missing_folder_is_a_clear_error_without_asking_the_hub(tmp_path):
    with pytest.raises(FedExpertsError, match=r"no model folder at .*nothing-here"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(FedExpertsError, match=r"no model folder at \./nothing-here"):
        load_model("./nothing-here")

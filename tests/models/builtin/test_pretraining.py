import json

import torch
import transformers

from fedexperts.data.expertbench import ExpertBench
from fedexperts.models import builtin
from fedexperts.models.builtin import RECIPES, build_tokenizer, pretrain
from fedexperts.models.load import load_model
from fedexperts.moe import moe_layers

MICRO = RECIPES["micro"]


def test_checkpoint_loads_with_plain_transformers_and_is_a_supported_moe(built):
    model = transformers.AutoModelForCausalLM.from_pretrained(built)
    tokenizer = transformers.AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "olmoe"
    assert model.config.num_experts == 8
    assert len(moe_layers(model)) == MICRO.num_layers
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.chat_template
    text = "Question: What does Varo export?\nAnswer: salt"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    loaded = load_model(built)
    assert loaded.family.model_type == "olmoe"


def test_pretraining_is_deterministic(built, tmp_path):
    again = pretrain(MICRO, tmp_path / "again", progress=False)
    first = transformers.AutoModelForCausalLM.from_pretrained(built).state_dict()
    second = transformers.AutoModelForCausalLM.from_pretrained(again.path).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    metrics = json.loads((built / builtin.METRICS_FILE).read_text())
    assert again.metrics["probe_accuracy"] == metrics["probe_accuracy"]


def test_tokenizer_is_deterministic():
    bench = ExpertBench.from_seed(0)
    assert build_tokenizer(bench, MICRO).get_vocab() == build_tokenizer(bench, MICRO).get_vocab()

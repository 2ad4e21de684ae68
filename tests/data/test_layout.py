"""The seq2seq data path: rows, collation, the model's own label shift, the loss and generation on Switch."""

import pytest
import torch

from fedexperts.data import CAUSAL, IGNORE_INDEX, SEQ2SEQ, InstructionCollator, batch_layout, split_example
from fedexperts.evaluation import continuation_log_likelihoods, generate, token_loss
from fedexperts.models import tiny_model


def test_layout_follows_the_config():
    assert batch_layout(tiny_model("switch_transformers")) is SEQ2SEQ
    assert batch_layout(tiny_model("olmoe").config) is CAUSAL


def test_long_prompt_loses_its_left_end_and_the_response_is_kept_whole():
    input_ids, labels, truncated = split_example(list(range(10, 30)), [7, 8, 9], max_length=5, min_prompt_tokens=4)
    assert truncated
    assert input_ids == [25, 26, 27, 28, 29]  # the encoder keeps the end of the prompt
    assert labels == [7, 8, 9]  # every response token is a target: no prompt in the decoder
    assert split_example([1, 2], [3], max_length=5, min_prompt_tokens=4) == ([1, 2], [3], False)


def test_a_response_longer_than_max_length_is_never_cut():
    with pytest.raises(ValueError, match="response takes 6 tokens, more than the decoder's max_length 5"):
        split_example([1, 2], [3] * 6, max_length=5, min_prompt_tokens=0)
    with pytest.raises(ValueError, match="no tokens"):
        split_example([1, 2], [], max_length=5, min_prompt_tokens=0)


def test_collator_pads_prompt_and_response_to_their_own_widths():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [9]}, {"input_ids": [5], "labels": [9, 10, 11]}]
    batch = InstructionCollator(pad_token_id=0)(rows)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8], [5, 0, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[9, IGNORE_INDEX, IGNORE_INDEX], [9, 10, 11]]))


@pytest.fixture
def switch_and_batch():
    model = tiny_model("switch_transformers")
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [9, 1]}, {"input_ids": [5, 12], "labels": [9, 10, 11, 1]}]
    return model, InstructionCollator(pad_token_id=0)(rows)


def test_decoder_inputs_are_the_models_own_shift_of_the_labels(switch_and_batch):
    model, batch = switch_and_batch
    inputs = SEQ2SEQ.model_inputs(model, batch)
    assert "labels" not in inputs
    assert torch.equal(inputs["decoder_input_ids"], model._shift_right(batch["labels"]))
    assert inputs["decoder_input_ids"][:, 0].eq(model.config.decoder_start_token_id).all()
    assert torch.equal(inputs["decoder_attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert SEQ2SEQ.stack_masks(inputs) == {
        "encoder": inputs["attention_mask"],
        "decoder": inputs["decoder_attention_mask"],
    }


@torch.no_grad()
def test_loss_is_the_models_own_loss_over_the_response_tokens(switch_and_batch):
    model, batch = switch_and_batch
    logits = model(**SEQ2SEQ.model_inputs(model, batch)).logits
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(SEQ2SEQ.loss(logits, batch["labels"]), own)
    assert SEQ2SEQ.target_count(batch["labels"]) == 6
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [9, 1]}, {"input_ids": [5, 12], "labels": [9, 10, 11, 1]}]
    assert token_loss(model, rows, pad_token_id=0) == pytest.approx(float(own), rel=1e-5)


@torch.no_grad()
def test_causal_loss_is_shifted_by_one():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:])
    torch.testing.assert_close(CAUSAL.loss(logits, labels), expected)
    assert CAUSAL.target_count(labels) == 2


class Tokenizer:
    """Whitespace-separated integers in and out: the tiny Switch has no tokenizer of its own."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(word) for word in text.split()] for text in texts]}

    def batch_decode(self, rows, skip_special_tokens=True):
        drop = {0, 1} if skip_special_tokens else set()
        return [" ".join(str(int(token)) for token in row if int(token) not in drop) for row in rows]


@torch.no_grad()
def test_continuation_likelihood_reads_the_decoder_under_the_prompt(switch_and_batch):
    model, _ = switch_and_batch
    [score] = continuation_log_likelihoods(model, Tokenizer(), [("5 6 7", "9 10")])
    labels = torch.tensor([[9, 10]])
    logits = model(input_ids=torch.tensor([[5, 6, 7]]), labels=labels).logits
    expected = torch.log_softmax(logits[0], dim=-1).gather(-1, labels[0][:, None]).sum()
    assert score == pytest.approx(float(expected), rel=1e-5)


@torch.no_grad()
def test_generation_decodes_only_the_decoders_tokens():
    model = tiny_model("switch_transformers")
    prompts = ["5 6 7 8 9 10 11", "5"]  # different lengths: padded, on the right for an encoder
    texts = generate(model, Tokenizer(), prompts, max_new_tokens=3)
    alone = generate(model, Tokenizer(), prompts[1:], max_new_tokens=3)
    assert texts[1] == alone[0]  # padding changed nothing for the short prompt
    for text, prompt in zip(texts, prompts, strict=True):
        assert len(text.split()) <= 3 and not text.startswith(prompt)  # the prompt is not echoed

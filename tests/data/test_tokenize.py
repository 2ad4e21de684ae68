import datasets
import pytest
import torch

from fedexperts.data import (
    IGNORE_INDEX,
    InstructionCollator,
    join_example,
    prompt_template,
    tokenize_instructions,
)
from fedexperts.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_CONTEXT
from fedexperts.errors import DataError


def rows(*triples, category="closed_qa"):
    return datasets.Dataset.from_dict(
        {
            "instruction": [t[0] for t in triples],
            "context": [t[1] for t in triples],
            "response": [t[2] for t in triples],
            "category": [category] * len(triples),
        }
    )


def test_auto_template_prefers_the_chat_template(chat_tokenizer, plain_tokenizer):
    assert prompt_template(chat_tokenizer).kind == "chat"
    assert prompt_template(plain_tokenizer).kind == "alpaca"
    assert prompt_template(chat_tokenizer, "alpaca").kind == "alpaca"
    with pytest.raises(DataError, match="has no chat template"):
        prompt_template(plain_tokenizer, "chat")


def test_alpaca_prompt_with_and_without_context(plain_tokenizer):
    template = prompt_template(plain_tokenizer, "alpaca")
    assert template.prompt(plain_tokenizer, "Do it.", "") == ALPACA_PROMPT_NO_CONTEXT.format(instruction="Do it.")
    assert template.prompt(plain_tokenizer, "Do it.", "ctx") == ALPACA_PROMPT.format(
        instruction="Do it.", context="ctx"
    )
    assert "### Input:\nctx\n\n### Response:\n" in template.prompt(plain_tokenizer, "Do it.", "ctx")
    assert template.completion(plain_tokenizer, "Do it.", "", "done") == "done<|eos|>"


def test_chat_completion_is_what_follows_the_prompt(chat_tokenizer):
    template = prompt_template(chat_tokenizer)
    prompt = template.prompt(chat_tokenizer, "Who sold salt?", "Maren sold salt.")
    assert prompt == "<|user|>\nWho sold salt?\n\nMaren sold salt.\n<|assistant|>"
    assert template.completion(chat_tokenizer, "Who sold salt?", "Maren sold salt.", "Maren") == " Maren<|eos|>"


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_mask_the_prompt_and_keep_the_response(chat_tokenizer, template):
    data = rows(("Who sold salt?", "Maren sold salt.", "Maren"), ("Name a metal.", "", "iron"))
    tokenized = tokenize_instructions(data, chat_tokenizer, max_length=512, template=template)
    chosen = prompt_template(chat_tokenizer, template)
    triples = zip(data["instruction"], data["context"], data["response"], strict=True)
    for row, (instruction, context, response) in zip(tokenized.dataset, triples, strict=True):
        prompt_ids = chat_tokenizer(chosen.prompt(chat_tokenizer, instruction, context))["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"][:n] == prompt_ids
        assert row["labels"][:n] == [IGNORE_INDEX] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert chat_tokenizer.decode(row["labels"][n:]).strip() == response + "<|eos|>"
    assert tokenized.truncated == 0
    assert tokenized.dataset["category"] == ["closed_qa", "closed_qa"]


def test_long_prompt_is_cut_from_the_left_and_the_response_kept():
    input_ids, labels, truncated = join_example(list(range(10, 30)), [7, 8, 9], max_length=10, min_prompt_tokens=4)
    assert truncated
    assert input_ids == [23, 24, 25, 26, 27, 28, 29, 7, 8, 9]
    assert labels == [IGNORE_INDEX] * 7 + [7, 8, 9]


def test_short_example_is_untouched():
    input_ids, labels, truncated = join_example([1, 2], [3], max_length=10, min_prompt_tokens=4)
    assert (input_ids, labels, truncated) == ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3], False)


def test_response_that_cannot_fit_is_an_error_naming_the_row(chat_tokenizer):
    long_response = " ".join(["salt"] * 40)
    data = rows(("Q?", "", "ok"), ("Q?", "", long_response))
    with pytest.raises(DataError, match=r"row 2 cannot fit: its response takes \d+ tokens"):
        tokenize_instructions(data, chat_tokenizer, max_length=32)


def test_overlong_rows_can_be_skipped_and_counted(chat_tokenizer):
    long_response = " ".join(["salt"] * 40)
    data = rows(("Q?", "", "ok"), ("Q?", "", long_response), ("A much longer question " * 5, "", "fine"))
    tokenized = tokenize_instructions(data, chat_tokenizer, max_length=32, skip_overlong=True)
    assert len(tokenized.dataset) == 2
    assert len(tokenized.skipped) == 1 and tokenized.skipped[0].startswith("row 2 cannot fit")
    assert tokenized.truncated == 1
    assert all(len(ids) <= 32 for ids in tokenized.dataset["input_ids"])


def test_collator_pads_right_with_ignored_labels():
    collate = InstructionCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))

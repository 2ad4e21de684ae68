"""Trying an exported model: the run's own prompt format and greedy decoding, from either kind of folder."""

import pytest

from fedexperts.errors import FedExpertsError
from fedexperts.evaluation import generate as run_generate
from fedexperts.export import generate, load_exported
from fedexperts.export.assemble import assemble_client
from fedexperts.export.prompts import read_prompts, response_lines
from fedexperts.export.source import open_run
from fedexperts.export.write import write_export

INSTRUCTIONS = ["Name a colour.", "Say hello."]


@pytest.mark.parametrize("variant", ["fedavg", "flex"])
def test_an_export_completes_prompts_as_the_run_evaluated_them(variant, federation, tmp_path):
    assembled = assemble_client(open_run(federation(variant).run_dir), "client-0")
    template, tokenizer = assembled.template, assembled.tokenizer
    prompts = [template.prompt(tokenizer, text, "") for text in INSTRUCTIONS]
    in_run = run_generate(assembled.model, tokenizer, prompts, max_new_tokens=6, add_special_tokens=False)
    write_export(assembled, tmp_path / "out")
    exported = load_exported(tmp_path / "out")
    assert exported.prompt(INSTRUCTIONS[0]) == prompts[0] and "<|user|>" in prompts[0]
    assert exported.generate(INSTRUCTIONS, max_new_tokens=6) == in_run
    assert generate(tmp_path / "out", INSTRUCTIONS[1], max_new_tokens=6) == in_run[1:]


def test_a_prompt_file_is_one_object_with_a_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b", "context": "c"}\n')
    rows = read_prompts(path)
    assert rows == [{"prompt": "a", "id": 1}, {"prompt": "b", "context": "c"}]
    assert response_lines(rows, ["x", "y"]).splitlines()[0] == '{"prompt": "a", "id": 1, "response": "x"}'
    for text, problem in [
        ('{"prompt": "a"}\n["b"]\n', 'line 2: expected an object with a "prompt" string'),
        ('{"prompt": "a"}\n{"prompt": 3}\n', 'line 2: expected an object with a "prompt" string'),
        ('{"prompt": "a", "context": 1}\n', 'line 1: "context" must be a string'),
        ('{"prompt": \n', "line 1: bad JSON"),
        ("\n", "no prompts"),
    ]:
        path.write_text(text)
        with pytest.raises(FedExpertsError, match=problem):
            read_prompts(path)

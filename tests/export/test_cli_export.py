"""``fedexperts export`` and ``fedexperts generate`` on a finished run."""

import json

import pytest
from typer.testing import CliRunner

from fedexperts.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "client-0"
    result = runner.invoke(
        app, ["export", str(federation("fedavg").run_dir), "--client", "client-0", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: a Hugging Face checkpoint, LoRA merged, float32" in result.output
    return out


def test_export_then_generate_one_prompt(exported):
    result = runner.invoke(app, ["generate", str(exported), "Name a colour.", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1


def test_generate_a_prompt_file_to_jsonl(exported, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour.", "id": 1}\n{"prompt": "Say hello."}\n')
    result = runner.invoke(app, ["generate", str(exported), "--prompts", str(prompts), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["Name a colour.", "Say hello."] and rows[0]["id"] == 1
    assert all(isinstance(row["response"], str) for row in rows)
    output = tmp_path / "responses.jsonl"
    args = ["generate", str(exported), "--prompts", str(prompts), "--max-new-tokens", "3", "--output", str(output)]
    assert runner.invoke(app, args).exit_code == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists; give a new file name" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{out}"], "give --client ID or --global (one of them)"),
        (["--client", "client-0", "--global", "--out", "{out}"], "give --client ID or --global (one of them)"),
        (["--client", "client-5", "--out", "{out}"], "--client 'client-5' is not a client of"),
        (["--client", "client-0", "--out", "{full}"], "is not empty"),
        (["--client", "client-0", "--lora", "both", "--out", "{out}"], "--lora 'both': choose merged or adapter"),
        (["--client", "client-0", "--dtype", "int8", "--out", "{out}"], "--dtype 'int8': choose float32"),
    ],
)
def test_export_mistakes_are_one_line_and_exit_two(federation, tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    filled = [arg.format(out=tmp_path / "out", full=tmp_path / "full") for arg in args]
    result = runner.invoke(app, ["export", str(federation("fedavg").run_dir), *filled])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]


def test_generate_needs_exactly_one_prompt_source(exported, tmp_path):
    both = runner.invoke(app, ["generate", str(exported), "hi", "--prompts", str(tmp_path / "p.jsonl")])
    assert both.exit_code == 2 and "give a PROMPT or --prompts FILE.jsonl" in both.output
    stray = runner.invoke(app, ["generate", str(exported), "hi", "--output", str(tmp_path / "o.jsonl")])
    assert stray.exit_code == 2 and "--output goes with --prompts" in stray.output

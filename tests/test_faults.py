"""The faults a user can cause, through the CLI: each ends in exit code 2 and one line naming the field or file
(never a traceback, a tensor or a data row), leaves the user's files as they were, and what should work works.

Cases marked ``before_model`` must be reported before any model is loaded (or the built-in one pretrained).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedexperts import atomic
from fedexperts.cli import app

runner = CliRunner()

TINY = (
    "federation.clients=2",
    "federation.rounds=1",
    "train.steps_per_round=1",
    "train.batch_size=2",
    "data.scheme=iid",
    "data.max_length=64",
    "eval.max_examples=2",
    "eval.union_examples=0",
    "eval.probes=0",
    "eval.max_new_tokens=2",
)
SECRET = "zebra"
"""In every data row's response: it must never show in the output."""


@dataclass
class World:
    """The user's folder (data, configs, model copies), where runs go, and the trained micro model."""

    user: Path
    out: Path
    micro: Path
    monkeypatch: pytest.MonkeyPatch

    def data(self, name: str = "data.jsonl", rows: int = 24) -> Path:
        path = self.user / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            {"instruction": f"Name item {index}.", "response": f"{SECRET} {index}", "category": "ab"[index % 2]}
            for index in range(rows)
        ]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.user / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def model(self, name: str, drop: tuple[str, ...] = (), truncate: str | None = None) -> Path:
        """A copy of the micro model without ``drop`` files, or with ``truncate`` cut to half."""
        folder = self.user / name
        shutil.copytree(self.micro, folder)
        for pattern in drop:
            for path in folder.glob(pattern):
                path.unlink()
        if truncate is not None:
            target = folder / truncate
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        return folder

    def run(self, *extra: str, model: Path | None = None) -> list[str]:
        return ["run", f'model.name="{model or self.micro}"', f'output_dir="{self.out}"', *TINY, *extra]

    def refuse_writes(self, code: int) -> None:
        """Every file or folder fedexperts stages under ``out`` fails with ``code`` (as a full or read-only disk)."""
        for name in ("_new_file", "_new_folder"):
            real = getattr(atomic, name)

            def refusing(path: Path, real: Callable[[Path], None] = real) -> None:
                if str(path).startswith(str(self.out)):
                    raise OSError(code, os.strerror(code), str(path))
                real(path)

            self.monkeypatch.setattr(atomic, name, refusing)


@dataclass(frozen=True)
class Fault:
    name: str
    args: Callable[[World], list[str]]
    expect: tuple[str, ...] | None
    """Fragments of the one error line; ``None``: the command succeeds."""
    before_model: bool = False


def _foreign_pyproject(w: World) -> list[str]:
    w.file("app/pyproject.toml", '[project]\nname = "mine"\n')
    return ["flower", "app", "--out", str(w.user / "app")]


def _corrupt_saved_config(w: World) -> list[str]:
    """A finished run's saved config.toml overwritten with garbage, then resumed."""
    assert CliRunner().invoke(app, [*w.run(), "federation.rounds=1"]).exit_code == 0
    (w.out / "default" / "config.toml").write_text("this is [not toml")
    return [*w.run(), "federation.rounds=1", "--resume"]


def _relative_source(w: World) -> list[str]:
    w.data("exp/rows.jsonl")
    return [*w.run(), str(w.file("exp/config.toml", '[data]\nsource = "rows.jsonl"\n'))]


def _full_disk_mid_run(algorithm: str) -> Callable[[World], list[str]]:
    """The disk fills when the first tensors are saved: fedavg's round checkpoint, FLEx's clients' personal state."""

    def args(w: World) -> list[str]:
        import fedexperts.atomic

        def save_file(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(w.out / "default" / "checkpoints"))

        w.monkeypatch.setattr(fedexperts.atomic, "save_file", save_file)
        return w.run(f"data.source={w.data()}", f"algorithm.name={algorithm}")

    return args


def _refused(code: int) -> Callable[[World], list[str]]:
    def args(w: World) -> list[str]:
        w.refuse_writes(code)
        return w.run(f"data.source={w.data()}")

    return args


FAULTS = [
    # the config
    Fault("unknown-key", lambda w: w.run("federation.clinets=3"), ("federation.clinets", "unknown key"), True),
    Fault("no-such-algorithm", lambda w: w.run("algorithm.name=nosuch"), ("algorithm.name", "'flex'"), True),
    Fault(
        "key-of-another-algorithm",
        lambda w: w.run("algorithm.name=fedavg", "algorithm.flex.top_n=2"),
        ("algorithm.flex", "flex"),
        True,
    ),
    Fault("wrong-type", lambda w: w.run("federation.rounds=zero"), ("federation.rounds",), True),
    Fault("out-of-range", lambda w: w.run("data.test_fraction=1.5"), ("data.test_fraction",), True),
    Fault("missing-config", lambda w: [*w.run(), str(w.user / "nope.toml")], ("nope.toml", "no such config"), True),
    Fault("config-is-a-folder", lambda w: [*w.run(), str(w.user)], ("is a folder",), True),
    Fault("config-not-toml", lambda w: [*w.run(), str(w.file("bad.toml", "a = [1,"))], ("bad.toml", "TOML"), True),
    Fault(
        "config-not-utf8",
        lambda w: [*w.run(), str(w.file("latin.toml", b'name = "caf\xe9"\n'))],
        ("latin.toml", "UTF-8"),
        True,
    ),
    Fault("two-configs", lambda w: [*w.run(), "a.toml", "b.toml"], ("one config file at most",), True),
    # paths and data, all checked before a model is loaded
    Fault("missing-data-file", lambda w: w.run(f"data.source={w.user / 'gone.jsonl'}"), ("data.source", "gone"), True),
    Fault(
        "relative-source-missing",
        lambda w: [*w.run(), str(w.file("exp/c.toml", '[data]\nsource = "rows.jsonl"\n'))],
        ("data.source", str(Path("exp") / "rows.jsonl")),
        True,
    ),
    Fault("missing-model-folder", lambda w: w.run(model=w.user / "no-model"), ("model.name", "no-model"), True),
    Fault(
        "model-folder-without-config",
        lambda w: w.run(model=w.model("m", drop=("config.json",))),
        ("model.name", "config.json"),
        True,
    ),
    Fault("missing-mmlu", lambda w: w.run(f"eval.mmlu={w.user / 'mmlu'}"), ("eval.mmlu",), True),
    Fault("output-dir-is-a-file", lambda w: [*w.run(), f'output_dir="{w.data()}"'], ("output_dir", "is a file"), True),
    Fault(
        "data-not-utf8",
        lambda w: w.run(f"data.source={w.file('latin.csv', b'instruction,response' + bytes([10, 0xFF]) + b'x,y')}"),
        ("latin.csv", "UTF-8"),
        True,
    ),
    Fault(
        "data-row-without-response",
        lambda w: w.run(f"data.source={w.file('r.jsonl', w.data().read_text() + json.dumps({'instruction': 'q'}))}"),
        ("r.jsonl", "row 25", "response"),
        True,
    ),
    Fault("data-without-rows", lambda w: w.run(f"data.source={w.file('e.jsonl', '')}"), ("e.jsonl", "no rows"), True),
    # the model
    Fault(
        "model-without-weights",
        lambda w: w.run(f"data.source={w.data()}", model=w.model("m", drop=("*.safetensors",))),
        ("weights", "model.safetensors"),
    ),
    Fault(
        "truncated-weights",
        lambda w: w.run(f"data.source={w.data()}", model=w.model("m", truncate="model.safetensors")),
        ("weights", "truncated or corrupt"),
    ),
    Fault(
        "model-without-tokenizer",
        lambda w: w.run(f"data.source={w.data()}", model=w.model("m", drop=("tokenizer*",))),
        ("tokenizer", "tokenizer.json", str(Path("user") / "m")),
    ),
    Fault("every-row-too-long", lambda w: w.run(f"data.source={w.data()}", "data.max_length=8"), ("data.max_length",)),
    # the disk
    Fault("read-only-output", _refused(errno.EROFS), ("read-only", "output_dir")),
    Fault("disk-full-at-start", _refused(errno.ENOSPC), ("No space left", "disk is full")),
    Fault("disk-full-at-the-checkpoint", _full_disk_mid_run("fedavg"), ("checkpoints", "disk is full")),
    Fault("disk-full-in-the-clients", _full_disk_mid_run("flex"), ("round 1", "client-0", "No space left")),
    Fault("corrupt-saved-config-on-resume", _corrupt_saved_config, ("config.toml", "TOML")),
    # other commands
    Fault("app-out-is-a-file", lambda w: ["flower", "app", "--out", str(w.data())], ("data.jsonl", "is a file"), True),
    Fault("app-out-holds-another-project", _foreign_pyproject, ("pyproject.toml", "not a fedexperts"), True),
    Fault("simulate-zero-cpus", lambda w: ["flower", "simulate", "--cpus-per-client", "0"], ("--cpus-per-client",)),
    Fault("partition-alpha-zero", lambda w: ["partition", "--alpha", "0"], ("--alpha", "greater than 0"), True),
    Fault("partition-unknown-scheme", lambda w: ["partition", "--scheme", "zipf"], ("--scheme",), True),
    Fault("partition-missing-file", lambda w: ["partition", str(w.user / "x.csv")], ("SOURCE", "x.csv"), True),
    Fault("compare-bad-seeds", lambda w: ["compare", "--seeds", "one"], ("--seeds",), True),
    Fault("compare-unknown-study", lambda w: ["compare", "--study", "nosuch"], ("unknown study",), True),
    Fault("config-show-unknown-key", lambda w: ["config", "show", "train.lr=1"], ("train.lr",), True),
    Fault("report-on-a-non-run", lambda w: ["report", str(w.user)], ("metrics.jsonl",), True),
    # what works
    Fault("relative-source-resolves-against-the-config", _relative_source, None),
    Fault(
        "bad-rows-skipped-when-asked",
        lambda w: w.run(
            f"data.source={w.file('r.jsonl', w.data().read_text() + json.dumps({'instruction': 'q'}) + chr(10))}",
            "data.skip_bad_rows=true",
        ),
        None,
    ),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def world(tmp_path, micro_model_path, monkeypatch):
    (tmp_path / "user").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative paths in a config file must not resolve here
    monkeypatch.setenv("FEDEXPERTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return World(tmp_path / "user", tmp_path / "runs", micro_model_path, monkeypatch)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_fault(fault: Fault, world: World, monkeypatch):
    args = fault.args(world)
    if fault.before_model:
        import fedexperts.experiment

        def load_base(config):
            raise AssertionError("the model was loaded before the fault was reported")

        monkeypatch.setattr(fedexperts.experiment, "load_base", load_base)
    before = _snapshot(world.user)
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    output = result.output
    assert "Traceback" not in output and "tensor(" not in output and SECRET not in output, output
    assert _snapshot(world.user) == before, "the user's files changed"
    if fault.expect is None:
        assert result.exit_code == 0, output
        return
    assert result.exit_code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output  # one line, the last: nothing wraps it
    for fragment in fault.expect:
        assert fragment in errors[0], (fragment, errors[0])
    assert not (world.user.parent / "cache").exists(), "the built-in model was looked for"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_output_folder_is_one_line(world: World):
    world.out.mkdir()
    world.out.chmod(0o500)
    try:
        result = runner.invoke(app, world.run(), env={"COLUMNS": "80"})
    finally:
        world.out.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert "Permission denied" in result.output and "Traceback" not in result.output

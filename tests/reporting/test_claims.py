"""The claims table: each verdict from paired differences of generated study folders, and the file rewrite."""

import pytest
from typer.testing import CliRunner

from fedexperts.cli import app
from fedexperts.errors import FedExpertsError
from fedexperts.reporting.claims import BEGIN, CLAIMS, END, Claim, claim_rows, claims_markdown, write_claims

from .helpers import simple_run

STUDY = "flex-pathological"


def _method(studies, name, rouges, **options):
    """One method of the study over seeds 0, 1, ...: every client's own ROUGE-L is the seed's value."""
    for seed, value in enumerate(rouges):
        simple_run(studies / STUDY / name / f"seed-{seed}", seed=seed, own_rouge_l=(value,) * 3, **options)


def _claim(baseline, metric="personalized_rouge_l"):
    return Claim("FLEx", "beats it", "n/a", STUDY, metric, "flex", baseline)


def test_each_verdict_follows_the_paired_interval(tmp_path):
    _method(tmp_path, "flex", [0.30, 0.60, 0.45, 0.50, 0.40], bytes_down=100)
    _method(tmp_path, "local", [0.25, 0.56, 0.40, 0.44, 0.36])  # flex ahead by ~0.05 on every seed
    _method(tmp_path, "fedavg", [0.40, 0.70, 0.52, 0.61, 0.47])  # ahead of flex on every seed
    _method(tmp_path, "dense", [0.35, 0.55, 0.45, 0.55, 0.35], bytes_down=5000)  # swings both ways
    claims = [_claim("local"), _claim("fedavg"), _claim("dense"), _claim("dense", "bytes_per_client_round")]
    claims.append(_claim("random-expert"))
    rows = claim_rows(tmp_path, claims)
    verdicts = [row.verdict for row in rows]
    assert verdicts[0] == "reproduced"
    assert verdicts[1] == "refuted: fedavg is better"
    assert verdicts[2].startswith("not reproduced: no difference shown (detectable at n=5:")
    assert verdicts[3] == "reproduced"  # fewer bytes: lower is better
    assert verdicts[4] == f"not run: `fedexperts compare --study {STUDY}`"
    assert rows[0].ours.startswith("+0.0") and rows[0].ours.endswith("n=5") and " p=0.0625" in rows[0].ours


def test_untestable_claims_say_why_and_unfinished_runs_do_not_count(tmp_path):
    _method(tmp_path, "flex", [0.5, 0.6])
    simple_run(tmp_path / STUDY / "local" / "seed-0", seed=0, finished=False)
    rows = claim_rows(tmp_path, [_claim("local"), Claim("FedMoE", "x", "n/a", STUDY, "probes", "a", "b", "why not")])
    assert rows[0].verdict.startswith("not run")
    assert rows[1].verdict == "not testable here: why not"


def test_every_paper_claim_has_a_row_even_before_any_study_ran(tmp_path):
    rows = claim_rows(tmp_path)
    assert len(rows) == len(CLAIMS)
    assert {row.claim.paper for row in rows} == {"FLEx", "FedMoE"}
    text = claims_markdown(rows)
    assert text.count("\n") == len(CLAIMS) + 2
    assert "fedmoe picks sub-MoEs (search, recommendation) that beat randomly chosen ones (random-moe;" in text
    with pytest.raises(FedExpertsError, match="does not exist"):
        claim_rows(tmp_path / "missing")


def test_write_replaces_only_the_claims_part(tmp_path):
    document = tmp_path / "RESULTS.md"
    document.write_text(f"# Results\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Section\nkept\n", encoding="utf-8")
    rows = claim_rows(tmp_path)
    write_claims(document, rows)
    text = document.read_text(encoding="utf-8")
    assert "old table" not in text and claims_markdown(rows) in text
    assert text.startswith("# Results\n\nintro\n\n") and text.endswith(f"{END}\n\n## Section\nkept\n")
    write_claims(document, rows)  # idempotent
    assert document.read_text(encoding="utf-8") == text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(FedExpertsError, match="has no claims part"):
        write_claims(plain, rows)
    assert plain.read_text(encoding="utf-8") == "no markers\n"


def test_the_command_prints_and_writes_and_names_a_missing_folder(tmp_path):
    _method(tmp_path, "flex", [0.5, 0.6, 0.7])
    _method(tmp_path, "local", [0.4, 0.5, 0.6])
    document = tmp_path / "RESULTS.md"
    document.write_text(f"{BEGIN}\n{END}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["claims", str(tmp_path), "--write", str(document)])
    assert result.exit_code == 0, result.output
    assert "reproduced" in result.output and "wrote" in result.output
    assert "| FLEx | flex personalizes better than local-only training" in document.read_text(encoding="utf-8")
    missing = CliRunner().invoke(app, ["claims", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_fedmoe_paper_claims_read_each_task_over_its_own_clients(tmp_path):
    from fedexperts.reporting.claims import _fedmoe_paper_claims

    from .helpers import client_final, client_round, final_line, round_line, run_line, scores, write_run

    groups = {"0": "classification", "1": "closed_qa", "2": "summarization"}

    def run(method, seed, accuracy):
        folder = tmp_path / "fedmoe-paper" / method / f"seed-{seed}"
        finals = {client: client_final(own=scores(accuracy=accuracy, token_f1=0.5, rouge_2=0.2)) for client in groups}
        parts = {client: {**client_round(), "model_bytes": 1000} for client in groups}
        info = run_line(list(groups), rounds=1, seed=seed, groups=groups)
        write_run(folder, [info, round_line(1, parts), final_line(finals)])

    for seed, accuracy in enumerate([0.50, 0.62, 0.55, 0.58, 0.66]):
        run("fedmoe@switch-32", seed, accuracy + 0.05)
        run("random-moe@switch-32", seed, accuracy)
    claims = _fedmoe_paper_claims("fedmoe-paper")
    rows = claim_rows(tmp_path, claims)
    by_metric = {row.claim.metric: row for row in rows}
    assert by_metric["task_classification_accuracy"].verdict == "reproduced"
    assert by_metric["task_closed_qa_token_f1"].verdict.startswith("not reproduced")  # equal on every seed
    assert by_metric["client_model_gb"].verdict.startswith("not run")  # no dense@switch-8 runs

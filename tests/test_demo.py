"""`distill demo` end to end at tiny budgets: every stage runs and the table has every row."""

from __future__ import annotations

import json

import pytest

from distillflow.flows.demo import OWN_VOCABULARY_STUDENTS, STUDENTS


@pytest.mark.slow
@pytest.mark.deepspeed
def test_short_demo_trains_every_student_and_evaluates_them(tiny_demo):
    tmp_path, budget, result = tiny_demo["workdir"], tiny_demo["budget"], tiny_demo["result"]

    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] > 0
    rows = {row["model"]: row for row in result["report"]["table"]}
    assert list(rows) == ["teacher", *STUDENTS]
    for name in STUDENTS:
        assert (tmp_path / "students" / name / "final" / "config.json").is_file()
        assert rows[name]["params"] * 4 <= rows["teacher"]["params"]  # at most 1/4 of the teacher
        assert rows[name]["tok_s_at_1"] > 0 and rows[name]["robust_acc"] is not None
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["table"] == result["report"]["table"]
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "chart.png").is_file()
    # the reference student learns from true answers of the same prompts
    assert 0 < result["training"]["reference"]["steps"] == budget.student_steps
    # the own-vocabulary students: one BPE of their own, not the teacher's; kd_greybox's
    # targets are the teacher's top-k aligned onto it
    from distillflow.training.vocabulary import load_tokenizer

    own = load_tokenizer(tmp_path / "student-bpe-init").get_vocab()
    assert all(load_tokenizer(tmp_path / "students" / name / "final").get_vocab() == own for name in OWN_VOCABULARY_STUDENTS)
    assert own != load_tokenizer(result["training"]["kd_sampled"]["final_dir"]).get_vocab()
    coverage = result["training"]["kd_greybox"]["greybox_coverage"]
    assert coverage["exact"] + coverage["merged"] > 0 and coverage["rows_without_logprobs"] == 0

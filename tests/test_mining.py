"""Hard-prompt mining: scores find a planted hard prompt, the selection caps each kind, and
`distill mine` end to end (candidates → teacher → scores → new dataset version → capture →
retrain → eval), with provenance, no duplicate of a dataset row and nothing paid twice."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.flows.demo import KD_STUDENT
from distillflow.config import ConfigError, parse_config
from distillflow.training.scratch import build_tiny_llama
from distillflow.storage.parquet import read_table
from distillflow.tasks.filters.dedup import normalize_text
from distillflow.tasks.mining.steps import MiningPlan, score_candidates, select_candidates
from distillflow.tasks.mining.config import MiningConfig


def greedy_answer(model, tokenizer, prompt: str, tokens: int = 6) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    model, tokenizer = build_tiny_llama(path, hidden_size=32, num_heads=1, num_layers=1, seed=0)
    return path, model.eval(), tokenizer


def plan(student_dir: Path, score: str) -> MiningPlan:
    mining = MiningConfig(candidates=10, keep=2, score=score)
    return MiningPlan(mining, Path("ds"), Path("out"), student_dir, None, score, None, None, None, 256)


@pytest.mark.parametrize("score", ["ce", "disagreement"])
def test_a_planted_hard_prompt_scores_above_easy_ones(student, score):
    path, model, tokenizer = student
    prompts = [f"Tell me about item {i}" for i in range(6)]
    # Easy by construction: the teacher's answer is what the student itself says. Hard: an
    # answer the student never produces.
    rows = [{"id": str(i), "prompt": p, "response": greedy_answer(model, tokenizer, p)} for i, p in enumerate(prompts)]
    rows[3]["response"] = "zebra quartz vortex"
    scores = score_candidates(plan(path, score), rows, log=lambda _: None)
    assert max(range(len(rows)), key=scores.__getitem__) == 3
    assert all(scores[3] > scores[i] for i in range(len(rows)) if i != 3)


def test_selection_takes_the_hardest_with_a_cap_per_kind_or_a_random_draw():
    rows = [{"id": f"r{i}", "strategy": kind} for i, kind in enumerate(["a:typo"] * 6 + ["b:unicode"] * 3)]
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    chosen = select_candidates(rows, scores, keep=4, max_share_per_kind=0.5, selection="hardest", seed=0)
    assert chosen == [0, 1, 6, 7]  # two typos (the cap), then the hardest of the other kind
    # caps that cannot be met still fill every place, hardest first
    assert select_candidates(rows, scores, keep=8, max_share_per_kind=0.25, selection="hardest", seed=0) == [0, 1, 6, 7, 2, 3, 4, 5]
    drawn = select_candidates(rows, scores, keep=4, max_share_per_kind=0.5, selection="random", seed=1)
    assert len(set(drawn)) == 4 and drawn == select_candidates(rows, scores, 4, 0.5, "random", 1)


def test_mining_settings_are_checked_when_the_config_loads(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"prompt": "p"}\n')
    base = {"name": "t", "output_dir": str(tmp_path), "seeds": [{"path": str(tmp_path / "s.jsonl")}], "teacher": {"model": "m"}}
    for mining, needle in (
        ({"strategies": {"seed": 1.0}}, "unknown \\['seed'\\]"),
        ({"candidates": 10, "keep": 20}, "keep \\(20\\) is more than candidates"),
        ({"score": "entropy"}, "mining.score"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config({**base, "mining": mining}, "c.yaml")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_distill_mine_adds_hard_prompts_retrains_and_evaluates(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = tiny_demo["workdir"]
    config = yaml.safe_load((workdir / "demo.yaml").read_text())
    # kd_topk (the kd_sampled student's settings): the mined shard needs the teacher's tokens captured
    config["training"].update(
        max_steps=3, output_dir=str(workdir / "students" / KD_STUDENT), objective="kd_topk", temperature=1.0
    )
    config["evaluation"]["output_dir"] = str(tmp_path / "eval")
    config["mining"] = {
        "output_dir": str(tmp_path / "mined"),
        "candidates": 40,
        "keep": 10,
        "max_share_per_kind": 0.3,
        "train_output_dir": str(tmp_path / "student-mined"),
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = CliRunner().invoke(app, ["mine", "mine.yaml"])
    assert result.exit_code == 0, result.output

    parent = read_table(workdir / "dataset" / "data").to_pylist()
    rows = read_table(tmp_path / "mined" / "data").to_pylist()  # shards with different columns, promoted
    mined = [row for row in rows if row["strategy"].startswith("mined:")]
    assert len(rows) == len(parent) + 10 and len(mined) == 10
    parent_ids = {row["id"] for row in parent}
    parent_texts = {normalize_text(row["prompt"]): row["id"] for row in parent}
    for row in mined:
        assert row["parent_id"] in parent_ids and row["mining_score"] is not None
        assert row["id"] not in parent_ids
        # Equal after case/space folding only when it is a variant of its own parent (the
        # build's `filters.keep_variants_of_parent`): never a copy of another dataset row.
        assert parent_texts.get(normalize_text(row["prompt"]), row["parent_id"]) == row["parent_id"]
        assert row["teacher_topk"] is not None  # capture-logits ran on the new shard
    kinds = {row["strategy"] for row in mined}
    assert all(sum(row["strategy"] == kind for row in mined) <= 3 for kind in kinds)  # the cap per kind
    candidates = pq.read_table(tmp_path / "mined" / "candidates.parquet").to_pylist()
    kept = sorted((c for c in candidates if c["selected"]), key=lambda c: -c["score"])
    assert len(kept) == 10 and len(candidates) > 10
    manifest = json.loads((tmp_path / "mined" / "manifest.json").read_text())
    assert manifest["mining"]["score"] == "kl" and manifest["counts"]["mined"] == 10
    assert manifest["mining"]["mean_score_kept"] > manifest["mining"]["mean_score_all"]
    assert manifest["mining"]["parent"]["rows"] == len(parent)

    report = json.loads((tmp_path / "eval-mined" / "report.json").read_text())  # <evaluation.output_dir>-mined
    assert {row["model"] for row in report["table"]} == {"before", "after"}
    assert (tmp_path / "student-mined" / "final" / "config.json").is_file()
    assert "clean accuracy" in result.output

    # A second run pays for no answer again: answers are in the ledger (failed requests, which
    # were never answered, are the only ones asked again).
    failed = manifest["mining"]["teacher_errors"]
    result = CliRunner().invoke(app, ["mine", "mine.yaml"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "mined" / "manifest.json").read_text())
    assert again["mining"]["teacher_usage"]["requests_sent"] == failed, manifest["mining"]["rejects"]
    assert again["mining"]["teacher_usage"]["ledger_hits"] >= manifest["mining"]["answered"], manifest["mining"]["rejects"]

"""`distill mine CONFIG`: the `mine` flow. It wires the steps of tasks/mining/steps.py — candidates
→ teacher (the build's client, ledger and response filters) → student scores → selection →
new dataset version → (capture-logits for white-box data) → retrain → eval."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from distillflow.config import DistillConfig, load_config
from distillflow.interrupt import cancel_on_interrupt
from distillflow.progress import ProgressBar
from distillflow.runs import get_run_logger
from distillflow.storage.ledger import TEACHER_LEDGER, Ledger
from distillflow.storage.manifest import Manifest
from distillflow.tasks.build.steps import answer_batch_task, filter_responses_task
from distillflow.tasks.mining.steps import (
    MiningPlan,
    candidates_task,
    plan_mining,
    score_task,
    select_candidates,
    write_task,
)
from distillflow.tasks.teacher.budget import FailureBudget
from distillflow.tasks.teacher.choose import make_teacher
from distillflow.tasks.teacher.errors import TeacherAborted
from distillflow.tasks.teacher.protocol import resolve_api_key


def retrain_config(config: DistillConfig, plan: MiningPlan) -> dict[str, Any]:
    """The config of the retrained student: the new dataset, its own run and eval directories;
    `continue` starts from the current student instead of the initialisation."""
    data = config.model_dump(mode="json", exclude={"sweep", "mining"})
    training = data["training"]
    training.update(dataset_dir=str(plan.output_dir), output_dir=str(plan.train_output_dir))
    if plan.mining.retrain == "continue":
        training.update(student=str(plan.student), derive_student=None)
    if data.get("capture") is not None:
        data["capture"].update(input_dir=str(plan.output_dir), output_dir=str(plan.output_dir))
    if data.get("evaluation") is not None and plan.eval_output_dir is not None:
        evaluation = data["evaluation"]
        judge = evaluation.get("judge") is not None
        reference = next((m for m in evaluation["models"] if m["name"] == config.evaluation.baseline_name), None)  # type: ignore[union-attr]
        evaluation["models"] = [
            {"name": "before", "path": str(plan.student)},
            {"name": "after", "path": str(Path(plan.train_output_dir) / "final")},  # type: ignore[arg-type]
        ] + ([reference] if judge and reference else [])
        evaluation["reference_model"] = reference["name"] if judge and reference else None
        evaluation["output_dir"] = str(plan.eval_output_dir)
        heldout = evaluation.get("heldout")
        if heldout is not None and heldout.get("dataset_dir") is None:
            heldout["dataset_dir"] = str(plan.dataset_dir)  # the same held-out rows as before mining
    return data


@flow(name="mine")
def mine(config_path: str) -> dict[str, Any]:
    """Mine the prompts the student gets most wrong; a new dataset version (and a retrained student)."""
    logger = get_run_logger()
    started = time.perf_counter()
    config = load_config(config_path, check_files=False)
    plan = plan_mining(config, config_path)
    api_key = resolve_api_key(config.teacher.api_key_env) if config.teacher.backend == "openai" else None
    ledger = Ledger(config.output_dir / TEACHER_LEDGER)  # the build's ledger: answers are shared, paid once
    teacher = make_teacher(config.teacher, api_key)
    try:
        with cancel_on_interrupt(lambda: teacher.abort(TeacherAborted("interrupted by a signal"))):
            candidates, summary = candidates_task(config, plan, teacher, ledger)
            logger.info("%d candidates after dedup against %s", len(candidates), plan.dataset_dir)
            progress = ProgressBar(f"{config.name}-mine teacher", len(candidates), "answered")
            budget = FailureBudget(len(candidates), config.teacher, on_exceeded=teacher.abort)
            size = config.teacher.batch_size
            answered: list[dict[str, Any]] = []
            rejects = []
            with progress.shown():
                for index, start in enumerate(range(0, len(candidates), size)):
                    rows, errors = answer_batch_task(
                        index, quote(candidates[start : start + size]), config, teacher, ledger, progress, budget
                    )
                    answered += rows
                    rejects += errors
    finally:
        teacher.close()
        ledger.close()
    accepted, response_rejects = filter_responses_task(quote(answered), config)
    rejects += response_rejects
    scores = score_task(plan, quote(accepted))
    mining = plan.mining
    chosen = select_candidates(accepted, scores, mining.keep, mining.max_share_per_kind, mining.selection, mining.random_seed)
    summary.update(
        answered=len(answered),
        teacher_errors=len(rejects) - len(response_rejects),  # not answered: asked again by a rerun
        scored=len(accepted),
        teacher_usage=teacher.stats.to_dict(),
    )
    manifest = write_task(plan, quote(accepted), quote(scores), chosen, quote(rejects), summary, [api_key] if api_key else [])
    mined = Manifest.of(manifest).mining or {}
    result: dict[str, Any] = {"dataset": str(plan.output_dir), "mining": mined}
    logger.info(
        "kept %d of %d scored candidates (mean %s %.4g vs %.4g over all) → %s",
        len(chosen), len(accepted), plan.score, mined["mean_score_kept"] or 0.0,
        mined["mean_score_all"] or 0.0, plan.output_dir,
    )  # fmt: skip

    if plan.train_output_dir is not None:
        retrain_path = Path(plan.output_dir) / "retrain.yaml"
        retrain = retrain_config(config, plan)
        retrain_path.write_text(yaml.safe_dump(retrain, sort_keys=False), encoding="utf-8")
        assert config.training is not None
        if config.training.objective == "kd_topk":
            from distillflow.flows.capture_logits import capture_logits
            from distillflow.tasks.capture.logits import resolve_capture_settings

            settings = resolve_capture_settings(config)
            settings = dataclasses.replace(settings, input_dir=str(plan.output_dir), output_dir=str(plan.output_dir))
            result["capture"] = capture_logits(settings)
        from distillflow.flows.train import train

        result["training"] = train(str(retrain_path))
        if plan.eval_output_dir is not None:
            from distillflow.flows.evaluate import evaluate

            report = evaluate(str(retrain_path))
            result["evaluation"] = report["table"]
            result["change"] = change_summary(report["table"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    create_markdown_artifact(key=_key(config.name), markdown=mining_markdown(result), description="distill mine")
    return result


def change_summary(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Clean accuracy and robustness gap before and after mining, and their changes."""
    rows = {row["model"]: row for row in table}
    before, after = rows["before"], rows["after"]

    def delta(key: str) -> float | None:
        return None if before.get(key) is None or after.get(key) is None else after[key] - before[key]

    gap_closed = None
    if before.get("gap") and after.get("gap") is not None:
        gap_closed = (before["gap"] - after["gap"]) / before["gap"]
    return {
        "clean_acc_before": before.get("clean_acc"),
        "clean_acc_after": after.get("clean_acc"),
        "clean_acc_change": delta("clean_acc"),
        "gap_before": before.get("gap"),
        "gap_after": after.get("gap"),
        "gap_change": delta("gap"),
        "gap_closed_share": gap_closed,
    }


def mining_markdown(result: dict[str, Any]) -> str:
    mining = result["mining"]
    lines = [
        f"# distill mine → `{result['dataset']}`",
        "",
        f"- candidates: {mining['generated']} generated, {mining['candidates']} after dedup against the dataset, "
        f"{mining['answered']} answered, {mining['scored']} scored ({mining['score']})",
        f"- kept {mining['kept']} ({mining['selection']}): " + ", ".join(f"{k} {v}" for k, v in mining["kept_per_kind"].items()),
        f"- mean score: kept {mining['mean_score_kept'] or 0:.4g}, all {mining['mean_score_all'] or 0:.4g}",
    ]
    change = result.get("change")
    if change:
        def pct(value: float | None) -> str:
            return "–" if value is None else f"{100 * value:.1f}%"

        lines.append(
            f"- clean accuracy {pct(change['clean_acc_before'])} → {pct(change['clean_acc_after'])}; robustness gap "
            f"{pct(change['gap_before'])} → {pct(change['gap_after'])}"
        )
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    import re

    return (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "mine") + "-mining"


def mine_command(config_path: str | Path) -> dict[str, Any]:
    """Validate the config (files, student, score) before Prefect starts, run, print the outcome."""
    from distillflow.tasks.preflight import load_model_dir

    config = load_config(config_path, check_files=False)
    plan = plan_mining(config, str(config_path))
    load_model_dir(plan.student, "mining.student", str(config_path))  # loads before any flow starts
    if plan.teacher_dir is not None and plan.score == "kl":
        load_model_dir(plan.teacher_dir, "teacher.model", str(config_path))
    if config.teacher.backend == "openai":
        resolve_api_key(config.teacher.api_key_env)
    result = mine(str(config_path))
    print(mining_markdown(result), end="")
    if result.get("evaluation"):
        from distillflow.tasks.evaluation.report import format_table

        print(format_table(result["evaluation"]))
    print(f"mined dataset: {result['dataset']} ({result['seconds']:.0f} s)", file=sys.stderr)
    return result

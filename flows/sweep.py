"""`distill sweep CONFIG`: the `sweep` parent flow. Each point is a `sweep-point` subflow
(train, then the `evaluate` flow), at most `sweep.parallel` at a time; the reference model
(the teacher) is evaluated once. It wires tasks/sweep/plan.py, which owns the plan, the state of
each point on disk and the ranked report."""

from __future__ import annotations

import contextvars
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from distillflow.config import load_config
from distillflow.runs import get_run_logger
from distillflow.tasks.sweep.plan import (
    SweepPlan,
    SweepPoint,
    eval_done,
    format_sweep_table,
    plan_sweep,
    point_row,
    prepare_point,
    read_state,
    short_error,
    summarize,
    sweep_markdown,
    table_rows,
    training_done,
    write_state,
    write_sweep_files,
)
from distillflow.tasks.train.student import train_student


def model_seconds(report: dict[str, Any]) -> float:
    """Seconds the eval spent answering and timing its models (the rest is set-up and reports)."""
    return sum(model.get("seconds") or 0.0 for model in report["models"].values())


def _error_text(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) < 2000 else text[:1000] + " … " + text[-900:]


@flow(name="sweep-point", flow_run_name="point-{name}")
def sweep_point(name: str, point: SweepPoint, retries: int) -> dict[str, Any]:
    """Train (unless a matching run finished before) and evaluate one point. A failed
    attempt is retried `retries` times; training resumes from its last checkpoint."""
    from distillflow.flows.evaluate import evaluate

    logger = get_run_logger()
    state = prepare_point(point)
    if eval_done(point, state):
        logger.info("%s: finished in an earlier run with the same settings and data; reused", name)
        return {**state, "status": "reused"}
    timing = {"train_s": 0.0, "eval_model_s": 0.0}
    for attempt in range(1, retries + 2):
        state["attempts"] = attempt
        try:
            if not training_done(point, state):
                began = time.perf_counter()
                try:
                    state["train"] = train_student(str(point.config_path))
                finally:
                    timing["train_s"] += time.perf_counter() - began
                write_state(point, state)
            report = evaluate(str(point.config_path))
            timing["eval_model_s"] += model_seconds(report)
            state.update(row=point_row(name, report), eval_key=point.eval_key, status="done", error=None)
            write_state(point, state)
            return {**state, "timing": timing}
        except Exception as error:  # noqa: BLE001 - a point fails alone; the sweep goes on
            state.update(status="failed", error=_error_text(error))
            write_state(point, state)
            logger.warning("%s: attempt %d failed: %s", name, attempt, state["error"])
    return {**state, "timing": timing}


@flow(name="sweep-reference", flow_run_name="reference-{name}")
def sweep_reference(name: str, point: SweepPoint) -> dict[str, Any]:
    """The reference model's eval (once per sweep; reused while its settings and data match)."""
    from distillflow.flows.evaluate import evaluate

    state = read_state(point)
    if state.get("eval_key") == point.eval_key and state.get("row"):
        return {**state, "status": "reused"}
    point.directory.mkdir(parents=True, exist_ok=True)
    import yaml

    point.config_path.write_text(yaml.safe_dump(point.config, sort_keys=False), encoding="utf-8")
    report = evaluate(str(point.config_path))
    state = {"name": name, "row": point_row(name, report), "eval_key": point.eval_key, "status": "done"}
    state["eval_model_s"] = model_seconds(report)
    write_state(point, state)
    return state


def run_points(plan: SweepPlan) -> list[dict[str, Any]]:
    """Every point, at most `parallel` at a time; results in grid order."""
    retries = plan.sweep.retries

    def one(point: SweepPoint) -> dict[str, Any]:
        try:
            return sweep_point(point.name, point, retries)
        except Exception as error:  # noqa: BLE001 - e.g. the point's directory cannot be written
            return {"name": point.name, "settings": point.settings, "status": "failed", "error": _error_text(error)}

    if plan.sweep.parallel == 1:
        return [one(point) for point in plan.points]
    with ThreadPoolExecutor(max_workers=plan.sweep.parallel, thread_name_prefix="sweep-point") as pool:
        # Each thread runs its subflow in a copy of this flow's context, so Prefect files it
        # under the parent run.
        futures = [pool.submit(contextvars.copy_context().run, one, point) for point in plan.points]
        return [future.result() for future in futures]


@flow(name="sweep")
def sweep(config_path: str) -> dict[str, Any]:
    """Train and evaluate every point of the config's `sweep:` grid; the ranked summary."""
    logger = get_run_logger()
    started = time.perf_counter()
    config = load_config(config_path, check_files=False)
    plan = plan_sweep(config, config_path)
    logger.info("%d points → %s", len(plan.points), plan.sweep.output_dir)
    reference = sweep_reference(plan.reference.name, plan.reference) if plan.reference is not None else None
    outcomes = run_points(plan)
    results = []
    for point, outcome in zip(plan.points, outcomes):
        result = {key: outcome.get(key) for key in ("status", "row", "train", "error", "attempts")}
        results.append({"name": point.name, "settings": point.settings, "directory": str(point.directory), **result})
    wall = time.perf_counter() - started
    train_s = sum((o.get("timing") or {}).get("train_s", 0.0) for o in outcomes)
    eval_s = sum((o.get("timing") or {}).get("eval_model_s", 0.0) for o in outcomes)
    if reference is not None and reference.get("status") == "done":
        eval_s += reference.get("eval_model_s", 0.0)
    timing = {
        "wall_s": round(wall, 1),
        "train_s": round(train_s, 1),
        "eval_model_s": round(eval_s, 1),
        "overhead_s": round(max(wall - train_s - eval_s, 0.0), 1),
        "overhead_share": max(wall - train_s - eval_s, 0.0) / wall if wall else 0.0,
        "points_run": sum(r["status"] in ("done", "failed") for r in results),
        "points_reused": sum(r["status"] == "reused" for r in results),
    }
    summary = summarize(plan, results, reference, timing)
    write_sweep_files(plan, summary)
    header, cells = table_rows(summary)
    create_table_artifact(key=_key(plan), table=[dict(zip(header, row)) for row in cells], description="distill sweep, ranked")
    create_markdown_artifact(key=f"{_key(plan)}-report", markdown=sweep_markdown(summary), description="distill sweep")
    return summary


def _key(plan: SweepPlan) -> str:
    import re

    name = Path(plan.sweep.output_dir).name.lower()
    return (re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:40] or "sweep") + "-sweep"


class SweepFailed(RuntimeError):
    """Some points failed; the others are ranked in sweep.md."""


def sweep_command(config_path: str | Path) -> dict[str, Any]:
    """Validate every point before Prefect starts, run, print the ranked table."""
    from distillflow.tasks.evaluation.evaluate import eval_run_from_config
    from distillflow.tasks.preflight import preflight_eval, preflight_training
    from distillflow.training.config import TrainingConfig

    config = load_config(config_path, check_files=False)
    plan = plan_sweep(config, str(config_path))
    # Every point's models load and fit before the first flow starts (tasks/preflight.py).
    for point in plan.points:
        preflight_training(TrainingConfig.model_validate(point.config["training"]), f"{config_path}: sweep point {point.name}")
    preflight_eval(eval_run_from_config(config, str(config_path)), only_existing=True)
    summary = sweep(str(config_path))
    print(format_sweep_table(summary))
    root = Path(summary["output_dir"])
    print(f"sweep: {root / 'sweep.md'} (sweep.json, sweep.png, best.yaml beside it)", file=sys.stderr)
    failed = [r for r in summary["points"] if r["status"] == "failed"]
    if failed:
        names = ", ".join(f"{r['name']} ({short_error(r.get('error'), limit=400)})" for r in failed)
        raise SweepFailed(
            f"{len(failed)} of {len(summary['points'])} sweep points failed: {names}; the others are ranked in "
            f"{root / 'sweep.md'}; fix the cause and rerun: finished points are reused"
        )
    return summary

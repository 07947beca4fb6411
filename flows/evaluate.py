"""`distill eval CONFIG`: the `evaluate` flow. It only wires the tasks of tasks/evaluation/evaluate.py:
prepare the prompts → one task per model → speed (every in-process model, interleaved) → judge →
report files and artifacts.

Tasks take NO_CACHE: an eval is cheap to rerun (endpoint answers come from ledgers) and its
inputs are model directories whose contents a cache key on the path would not see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.utilities.annotations import quote

from distillflow.runs import get_run_logger
from distillflow.tasks.evaluation.report import (
    format_table,
)
from distillflow.tasks.evaluation.evaluate import (
    evaluate_model_task,
    judge_task,
    load_eval_run,
    prepare_task,
    report_task,
    speed_task,
)


@flow(name="evaluate")
def evaluate(config_path: str) -> dict[str, Any]:
    """Evaluate every model of the config's `evaluation:` section; returns the report."""
    logger = get_run_logger()
    run = load_eval_run(config_path)
    prepared = prepare_task(run)
    logger.info("%d prompts per model (eval sets, perturbed copies, held-out rows)", len(prepared.items))
    records: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    for model in run.config.models:  # one at a time: in-process models share the memory and cores
        result = evaluate_model_task(run, model, quote(prepared.items))
        records += result["records"]
        infos.append(result["info"])
    speeds = speed_task(run, quote(prepared.items))  # in-process models, timed in interleaved rounds
    for info in infos:
        if info["kind"] == "in_process":
            info["speed"] = speeds.get(info["name"])
    judge = judge_task(run, quote(records)) if run.config.judge is not None else None
    return report_task(run, quote(records), quote(infos), quote(judge), prepared.skipped_perturbations)


def eval_command(config_path: str | Path) -> dict[str, Any]:
    """Validate the config, run the flow, print the comparison table; the report dict."""
    from distillflow.tasks.preflight import preflight_eval

    preflight_eval(load_eval_run(config_path))  # config and model errors before Prefect starts
    report = evaluate(str(config_path))
    print(format_table(report["table"]))
    print(f"report: {Path(report['output_dir']) / 'report.md'} (records, report.json, chart.png beside it)")
    return report

"""`distill eval CONFIG`: the `evaluate` flow. It only wires the tasks of tasks/evaluate.py:
prepare the prompts → one task per model → judge → report files and artifacts.

Tasks take NO_CACHE: an eval is cheap to rerun (endpoint answers come from ledgers) and its
inputs are model directories whose contents a cache key on the path would not see."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from distillflow.tasks.eval_config import EvalModel
from distillflow.tasks.eval_report import TABLE_COLUMNS, format_table, report_markdown, table_cells, write_report_files
from distillflow.tasks.evaluate import (
    EvalItem,
    EvalRun,
    PreparedItems,
    build_report,
    evaluate_model,
    judge_models,
    load_eval_run,
    prepare_items,
    records_to_jsonl,
)


@task(name="eval-prepare", cache_policy=NO_CACHE)
def prepare_task(run: EvalRun) -> PreparedItems:
    return prepare_items(run)


@task(name="eval-model", cache_policy=NO_CACHE, task_run_name="eval-{model.name}")
def evaluate_model_task(run: EvalRun, model: EvalModel, items: list[EvalItem]) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("%s: answering %d prompts", model.name, len(items))
    return evaluate_model(run, model, items, log=logger.info)


@task(name="eval-judge", cache_policy=NO_CACHE)
def judge_task(run: EvalRun, records: list[dict[str, Any]]) -> dict[str, Any]:
    return judge_models(run, records)


@task(name="eval-report", cache_policy=NO_CACHE)
def report_task(
    run: EvalRun, records: list[dict[str, Any]], infos: list[dict[str, Any]], judge: dict[str, Any] | None, skipped: dict[str, int]
) -> dict[str, Any]:
    report = build_report(run, records, infos, judge, skipped)
    judge_jsonl = records_to_jsonl(judge["records"]) if judge else None
    write_report_files(Path(run.config.output_dir), report, records_to_jsonl(records), judge_jsonl)
    key = _artifact_key(Path(run.config.output_dir).name)
    header = [title for _, title in TABLE_COLUMNS]
    create_table_artifact(
        key=f"{key}-eval-table",
        table=[dict(zip(header, row)) for row in table_cells(report["table"])],
        description="distill eval: one row per model",
    )
    markdown = report_markdown(report)
    chart = Path(run.config.output_dir) / "chart.png"
    if chart.is_file():  # accuracy vs size and per-set accuracy, inline
        from distillflow.tasks.artifact_charts import png_data_uri

        markdown += f"\n\n![accuracy vs size]({png_data_uri(chart.read_bytes())})\n"
    create_markdown_artifact(key=f"{key}-eval-report", markdown=markdown, description="distill eval report")
    return report


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "eval"


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

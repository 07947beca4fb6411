"""The build's steps as Prefect tasks, with the helpers they need: load seeds, generate
prompts, filter them, answer a batch (ledger first), write a shard, answer a whole shard
on a fan-out worker, finish the dataset; the stage timer with its heartbeat, the
interpreter settings of the teacher stage, and the messages of a build that stops
(no usable answers, the budget). flows/build.py wires them.

Tasks take NO_CACHE: their inputs are large lists whose hashing would cost more than the
work, and the durable cache of teacher answers is the ledger.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillflow.config import DistillConfig
from distillflow.progress import ProgressBar
from distillflow.progress import progress as report_progress
from distillflow.records import BUDGET_REASON, PromptRecord, Reject, TeacherAnswer
from distillflow.runs import get_run_logger
from distillflow.storage.dataset import dataset_card, finish_dataset, logprob_coverage
from distillflow.storage.ledger import TEACHER_LEDGER, Ledger
from distillflow.storage.manifest import build_manifest
from distillflow.storage.parquet import AnsweredRow
from distillflow.storage.seeds import SeedRows, load_seeds, split_repeated_seeds
from distillflow.tasks.build.shards import (
    BUILDING,
    ShardPlan,
    ShardResult,
    ShardTotals,
    answer_shard,
    answered_rows,
)
from distillflow.tasks.filters.passes import filter_prompts, filter_responses
from distillflow.tasks.teacher.budget import FailureBudget
from distillflow.tasks.teacher.errors import NoUsableAnswersError, TeacherFatalError
from distillflow.tasks.teacher.loop_gc import request_loop_gc
from distillflow.tasks.teacher.protocol import TeacherStats, build_messages
from distillflow.tasks.teacher.recording import answer_requests

HEARTBEAT_S = 60.0  # a stage running longer than this says so, every HEARTBEAT_S


@contextmanager
def stage(stage_seconds: dict[str, float], name: str, label: str, status: Any = None) -> Iterator[None]:
    """Time a stage into `stage_seconds[name]`; while it runs longer than `HEARTBEAT_S`, log
    every `HEARTBEAT_S` that it still runs (with `status()`, when given), so a stuck stage
    is visible."""
    started = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            extra = f": {status()}" if status is not None else ""
            print(
                f"[{label}] {name} still running after {time.perf_counter() - started:.0f} s{extra}",
                file=sys.stderr,
                flush=True,
            )

    threading.Thread(target=heartbeat, name=f"heartbeat-{name}", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        stage_seconds[name] = round(time.perf_counter() - started, 3)


@task(name="load-seeds", cache_policy=NO_CACHE)
def load_seeds_task(
    config: DistillConfig, prompt_column: str | None, read: SeedRows | None = None
) -> tuple[list[PromptRecord], list[Reject]]:
    """The seed rows, each once; the unreadable and repeated rows as rejects. `read`: the
    rows as `distill build` already read them (the files are then not read again)."""
    if read is None:
        seeds, seed_rejects = load_seeds(config.seeds, prompt_column)
    else:
        seeds, seed_rejects = read.prompts, read.rejects
    seeds, repeated_seeds = split_repeated_seeds(seeds)
    return seeds, seed_rejects + repeated_seeds


@task(name="generate-prompts", cache_policy=NO_CACHE)
def generate_prompts_task(config: DistillConfig, seeds: list[PromptRecord], teacher: Any, ledger: Ledger):
    from distillflow.prompts.generate import generate_prompts

    with report_progress(f"{config.name} generate", unit="teacher answers") as bar:

        def complete(messages_list: list[list[dict]]) -> list[TeacherAnswer]:
            return [answer for answer, _ in answer_requests(teacher, ledger, messages_list, progress=bar)]

        return generate_prompts(seeds, config.prompts, complete)


@task(name="filter-prompts", cache_policy=NO_CACHE)
def filter_prompts_task(prompts: list[PromptRecord], config: DistillConfig):
    # MinHash signatures go to disk during the pass; only band and exact keys stay in memory.
    return filter_prompts(prompts, config.filters, spill_dir=config.output_dir / BUILDING / "spill")


@task(name="answer-batch", cache_policy=NO_CACHE, task_run_name="answer-batch-{batch_index}")
def answer_batch_task(
    batch_index: int,
    prompts: list[PromptRecord],
    config: DistillConfig,
    teacher: Any,
    ledger: Ledger,
    progress: ProgressBar,
    budget: FailureBudget,
) -> tuple[list[AnsweredRow], list[Reject]]:
    """Ask the teacher for one batch (ledger first); answered rows and teacher-error rejects."""
    messages_list = [build_messages(p.prompt, config.teacher.system_prompt) for p in prompts]
    answers = answer_requests(teacher, ledger, messages_list, progress=progress, budget=budget)
    with_top_logprobs = bool(config.teacher.generation.top_logprobs)
    return answered_rows(prompts, answers, teacher_name(config), with_top_logprobs, config.teacher.stops)


@task(name="filter-responses", cache_policy=NO_CACHE)
def filter_responses_task(rows: list[AnsweredRow], config: DistillConfig) -> tuple[list[AnsweredRow], list[Reject]]:
    """The response filters over answered rows (mining; a build filters each shard as it writes it)."""
    return filter_responses(rows, config.filters)


@task(name="write-shard", cache_policy=NO_CACHE, task_run_name="write-shard-{index}")
def write_shard_task(index: int, prompts: int, reject_file: int, shards: Any) -> ShardResult:
    """One shard's data and rejects files (atomically), from what `shards` (a
    `ShardCollector`, or the shard writer process running one) collected of it batch by
    batch, through the response filters as it was answered."""
    return shards.write(index, prompts, reject_file)


@task(name="answer-shard", cache_policy=NO_CACHE, task_run_name="answer-shard-{index}")
def answer_shard_task(index: int, config: DistillConfig, reject_file: int) -> ShardResult:
    """One whole shard in a fan-out worker, with its own teacher client (tasks/build/shards.py);
    the worker reads the shard's prompts from the build's staging area."""
    return answer_shard(index, config, reject_file, config.output_dir / TEACHER_LEDGER)


def fan_out_runner(config: DistillConfig) -> Any:
    """Prefect's Dask task runner: the cluster at `dataset.dask_address`, or a local one of
    `dataset.workers` processes (one thread each: each runs one shard's event loop)."""
    from prefect_dask import DaskTaskRunner

    if config.dataset.dask_address:
        return DaskTaskRunner(address=config.dataset.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.dataset.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


def answer_shards_on_workers(config: DistillConfig, plan: ShardPlan, progress: ProgressBar, stats: Any) -> None:
    """Fan-out: every unfinished shard is one task on the Dask workers (2 per worker in flight,
    so a worker never waits for its next shard); each is recorded as finished the moment
    it returns, so a crash resumes after it."""
    from prefect.futures import as_completed

    pending = plan.unfinished()
    window = 2 * config.dataset.workers
    with fan_out_runner(config) as runner:
        in_flight: set[Any] = set()
        while pending or in_flight:
            while pending and len(in_flight) < window:
                index = pending.pop(0)
                in_flight.add(runner.submit(answer_shard_task, {
                    "index": index,
                    "config": config,
                    "reject_file": plan.first_reject_file + index,
                }))
            future = next(as_completed(list(in_flight)))
            in_flight.discard(future)
            result = future.result()
            plan.state.record(result)
            stats.add(result.usage)
            progress(result.prompts)


@task(name="finish-dataset", cache_policy=NO_CACHE)
def finish_dataset_task(
    config: DistillConfig, shards: dict[str, list[dict[str, Any]]], manifest: dict[str, Any], secrets: list[str]
) -> dict[str, Any]:
    if config.teacher.generation.top_logprobs:
        coverage = logprob_coverage(config.output_dir / BUILDING / "data", config.teacher.generation.top_logprobs)
        manifest = {**manifest, "teacher_logprobs": coverage}
    return finish_dataset(
        config.output_dir, config.output_dir / BUILDING, shards, manifest, dataset_card(manifest), secrets=secrets
    )


def teacher_name(config: DistillConfig) -> str:
    return Path(config.teacher.model).name if config.teacher.backend == "local" else config.teacher.model


@contextmanager
def client_bound_stage() -> Iterator[None]:
    """Interpreter settings for the teacher stage, where one event-loop thread issues every
    request and its CPU is the limit (restored afterwards):

    - a 50 ms GIL switch interval, so Prefect's bookkeeping threads do not preempt the loop
      every 5 ms (~10% throughput);
    - the garbage collector of a request loop (tasks/teacher/loop_gc.py `request_loop_gc`, as in a
      client process): the objects alive so far (prompts, configs, Prefect state) frozen out
      of it (~10% throughput at 20k prompts), young objects collected less often.
    """
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(max(switch_interval, 0.05))
    try:
        with request_loop_gc():
            yield
    finally:
        sys.setswitchinterval(switch_interval)


def no_usable_answers_message(
    config: DistillConfig, asked: int, reasons: Counter, examples: dict[str, str], stage_name: str
) -> str:
    """Why a run that asked the teacher `asked` prompts has no row to keep, and what to do.
    `reasons`: reject reason -> count; `examples`: reason -> one reject's detail."""
    listed = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(5))
    example = examples.get(reasons.most_common(1)[0][0], "") if reasons else ""
    detail = f"; e.g. {example[:300]}" if example else ""
    teacher = config.teacher
    where = teacher.base_url if teacher.backend == "openai" else teacher.model
    if stage_name == "teacher":
        fix = (
            "the teacher rejected or failed every request: check teacher.model, teacher.generation (e.g. "
            "top_logprobs or max_tokens the server does not support) and the server's log"
        )
        what = f"the teacher at {where} answered none of the {asked} prompts"
    else:
        fix = (
            "look at the answers (the detail above); if they are right, turn off or relax the filter "
            "that drops them under `filters:`"
        )
        what = f"the teacher at {where} answered {asked} prompts, but the response filters rejected every answer"
    return f"{what} ({listed}{detail}). Likely fix: {fix}. Nothing was written; answers received are in the ledger."


class BudgetTooSmallError(TeacherFatalError):
    """The budget does not cover even the first request."""


def budget_stop_message(config: DistillConfig, not_asked: int) -> str:
    """What the budget stopped, and how to continue."""
    teacher = config.teacher
    limits = " / ".join(
        f"{name}={value:g}"
        for name, value in (("teacher.max_budget_usd", teacher.max_budget_usd), ("teacher.max_total_tokens", teacher.max_total_tokens))
        if value is not None
    )
    return (
        f"stopped by the budget ({limits}): {not_asked} prompts were not sent, since their worst case "
        "(prompt + max_tokens) would have passed it. Every answer received is in the ledger and in the "
        f"dataset; rerun with a larger limit to ask only the {not_asked} others."
    )


def budget_summary(config: DistillConfig, usage: dict[str, Any], not_asked: int) -> dict[str, Any] | None:
    """For the manifest: the limits, what this run spent, and the prompts not sent."""
    teacher = config.teacher
    if teacher.max_budget_usd is None and teacher.max_total_tokens is None:
        return None
    return {
        "max_budget_usd": teacher.max_budget_usd,
        "max_total_tokens": teacher.max_total_tokens,
        "spent_usd": usage.get("estimated_cost_usd"),
        "spent_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "not_asked": not_asked,
    }


@dataclass
class PromptSide:
    """What a build made of its seeds before the teacher, for the manifest's counts."""

    seeds: int
    seeds_unused: int
    bad_seed_rows: int  # unreadable and repeated seed rows
    prompts_generated: int
    generation_rejects: int
    rejected: int  # every reject before the teacher (bad seeds, generation, prompt filters)
    reasons: Counter  # their reasons
    report: dict[str, Any]  # prompts per strategy, their diversity, warnings (prompts/report.py)

    @classmethod
    def of(
        cls, seeds: int, prompts: int, seed_rejects: list[Reject], generation_rejects: list[Reject],
        prompt_rejects: list[Reject], prompt_report: dict[str, Any],
    ) -> PromptSide:
        before_teacher = [*seed_rejects, *generation_rejects, *prompt_rejects]
        return cls(
            seeds, prompt_report.get("seeds_unused", 0), len(seed_rejects), prompts, len(generation_rejects),
            len(before_teacher), Counter(reject.reason for reject in before_teacher), prompt_report,
        )


def check_teacher_stage(config: DistillConfig, teacher: Any, totals: ShardTotals, prompts: int) -> tuple[str | None, int]:
    """After the teacher stage: ("budget" when the spending budget stopped it, else None;
    the prompts it did not send). Warns what the budget stopped; raises when nothing is left
    to write: the budget covered no request (`BudgetTooSmallError`), the teacher answered
    none of the `prompts` or the response filters kept none of its answers
    (`NoUsableAnswersError`)."""
    not_asked = totals.reject_reasons.get(BUDGET_REASON, 0)
    spending = getattr(teacher, "budget", None)
    stopped_by = "budget" if not_asked or (spending is not None and spending.exhausted) else None
    if stopped_by:
        get_run_logger().warning("%s", budget_stop_message(config, not_asked))
    if prompts and not totals.answered and stopped_by:
        raise BudgetTooSmallError(
            f"the budget (teacher.max_budget_usd={config.teacher.max_budget_usd}, teacher.max_total_tokens="
            f"{config.teacher.max_total_tokens}) does not cover even the first request's worst case (prompt + "
            f"generation.max_tokens={config.teacher.generation.max_tokens}): nothing was answered or written. "
            "Raise the limit (`distill build --dry-run` shows what the run costs) or lower max_tokens."
        )
    if prompts and not totals.answered:
        raise NoUsableAnswersError(
            no_usable_answers_message(config, prompts, totals.teacher_reasons, totals.examples, "teacher")
        )
    if totals.answered and not totals.accepted:
        raise NoUsableAnswersError(
            no_usable_answers_message(config, totals.answered, totals.response_reasons, totals.examples, "filter_responses")
        )
    return stopped_by, not_asked


def teacher_usage(config: DistillConfig, stats: TeacherStats) -> dict[str, Any]:
    """The manifest's `teacher_usage`: the teacher's counts, and what this run paid."""
    usage = stats.to_dict()
    usage["paid_requests"] = stats.requests_sent
    usage["mode"] = config.teacher.mode
    pricing = config.teacher.pricing
    if pricing is not None:
        # What this run paid (answers from the ledger are free), at the price table's rates.
        usage["estimated_cost_usd"] = round(
            pricing.cost_usd(stats.prompt_tokens, stats.completion_tokens, batch=config.teacher.mode == "batch"), 6
        )
    return usage


def dataset_manifest(
    config: DistillConfig,
    prompt_side: PromptSide,
    after_prompt_filters: int,
    totals: ShardTotals,
    stats: TeacherStats,
    teacher_failures: dict[str, Any],
    build: dict[str, Any],
    stopped_by: str | None,
    not_asked: int,
    elapsed_s: float,
    stage_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a build whose shards are all written (storage/manifest.py)."""
    usage = teacher_usage(config, stats)
    counts = {
        "seeds": prompt_side.seeds,
        "seeds_unused": prompt_side.seeds_unused,
        "bad_seed_rows": prompt_side.bad_seed_rows,
        "prompts_generated": prompt_side.prompts_generated,
        "generation_rejects": prompt_side.generation_rejects,
        "after_prompt_filters": after_prompt_filters,
        "teacher_answered": totals.answered,
        "teacher_errors": totals.teacher_errors,
        "accepted": totals.accepted,
        "rejected": prompt_side.rejected + sum(totals.reject_reasons.values()),
    }
    return build_manifest(
        config,
        counts=counts,
        reject_reasons=dict(sorted((prompt_side.reasons + totals.reject_reasons).items())),
        accepted_per_strategy=dict(sorted(totals.accepted_per_strategy.items())),
        prompt_report=prompt_side.report,
        teacher_usage=usage,
        teacher_failures=teacher_failures,
        build=build,
        stopped_by=stopped_by,
        budget=budget_summary(config, usage, not_asked),
        elapsed_s=elapsed_s,
        stage_seconds=stage_seconds,
    )

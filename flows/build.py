"""The `build_dataset` flow: seeds → prompts → prompt filters → teacher → response filters → Parquet.

The flow only wires; each task does one coarse step (a batch of hundreds of prompts, with
async I/O inside), because each Prefect task run costs milliseconds of bookkeeping.
Tasks take NO_CACHE: their inputs are large lists whose hashing would cost more than
the work, and the durable cache of teacher answers is the ledger. Large lists are passed
`quote()`d, so Prefect does not walk every row looking for upstream futures.
"""

from __future__ import annotations

import gc
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

import distillflow
from distillflow.config import DistillConfig, load_config
from distillflow.interrupt import cancel_on_interrupt
from distillflow.progress import ProgressBar, progress
from distillflow.records import PromptRecord, Reject, TeacherAnswer
from distillflow.storage.dataset import count_by, dataset_card, write_dataset
from distillflow.storage.ledger import Ledger
from distillflow.storage.seeds import load_seeds
from distillflow.tasks.filters import filter_prompts, filter_responses
from distillflow.tasks.teacher import (
    FailureBudget,
    NoUsableAnswersError,
    OpenAITeacher,
    TeacherAborted,
    TeacherFatalError,
    TeacherStats,
    answer_requests,
    build_messages,
    resolve_api_key,
)

LEDGER_PATH = Path(".ledger") / "teacher.sqlite"
BATCHES_IN_FLIGHT = 3
HEARTBEAT_S = 60.0  # a stage running longer than this says so, every HEARTBEAT_S


class LocalTeacherClient:
    """The in-process Hugging Face teacher behind the interface `answer_requests` expects."""

    def __init__(self, config) -> None:  # noqa: ANN001 - TeacherConfig
        self.config = config
        self.model = config.model
        self.stats = TeacherStats()
        self.batch_size = config.local_batch_size

    def answer_batch(self, messages_list: list[list[dict]]) -> list[TeacherAnswer]:
        from distillflow.tasks.teacher_local import get_local_teacher

        return get_local_teacher(self.config).answer_batch(messages_list)

    def abort(self, error: TeacherFatalError) -> None:
        """Nothing to cancel: the model answers in this thread, which the signal interrupts."""


def make_teacher(config: DistillConfig, api_key: str | None) -> OpenAITeacher | LocalTeacherClient:
    if config.teacher.backend == "local":
        return LocalTeacherClient(config.teacher)
    return OpenAITeacher(config.teacher, api_key=api_key)


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


def split_repeated_seeds(seeds: list[PromptRecord]) -> tuple[list[PromptRecord], list[Reject]]:
    """A seed prompt that appears again (same text) is a reject pointing at its first copy."""
    first: set[str] = set()
    unique: list[PromptRecord] = []
    repeated: list[Reject] = []
    for seed in seeds:
        if seed.id in first:
            repeated.append(Reject.of(seed, "exact_duplicate", "seed repeated in the input", duplicate_of=seed.id))
        else:
            first.add(seed.id)
            unique.append(seed)
    return unique, repeated


# -- tasks ----------------------------------------------------------------------------------


@task(name="load-seeds", cache_policy=NO_CACHE)
def load_seeds_task(config: DistillConfig, prompt_column: str | None) -> tuple[list[PromptRecord], list[Reject]]:
    return load_seeds(config.seeds, prompt_column)


@task(name="generate-prompts", cache_policy=NO_CACHE)
def generate_prompts_task(config: DistillConfig, seeds: list[PromptRecord], teacher: Any, ledger: Ledger):
    from distillflow.prompts.generate import generate_prompts

    with progress(f"{config.name} generate", unit="teacher answers") as bar:

        def complete(messages_list: list[list[dict]]) -> list[TeacherAnswer]:
            return [answer for answer, _ in answer_requests(teacher, ledger, messages_list, progress=bar)]

        return generate_prompts(seeds, config.prompts, complete)


@task(name="filter-prompts", cache_policy=NO_CACHE)
def filter_prompts_task(prompts: list[PromptRecord], config: DistillConfig):
    return filter_prompts(prompts, config.filters)


@task(name="answer-batch", cache_policy=NO_CACHE, task_run_name="answer-batch-{batch_index}")
def answer_batch_task(
    batch_index: int,
    prompts: list[PromptRecord],
    config: DistillConfig,
    teacher: Any,
    ledger: Ledger,
    progress: ProgressBar,
    budget: FailureBudget,
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Ask the teacher for one batch (ledger first); answered rows and teacher-error rejects."""
    messages_list = [build_messages(p.prompt, config.teacher.system_prompt) for p in prompts]
    answers = answer_requests(teacher, ledger, messages_list, progress=progress, budget=budget)
    teacher_name = Path(config.teacher.model).name if config.teacher.backend == "local" else config.teacher.model
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    for record, (answer, created_at) in zip(prompts, answers):
        if not answer.ok:
            rejects.append(Reject.of(record, answer.error or "teacher_error:unknown", answer.error_detail or ""))
            continue
        row = {
            "id": record.id,
            "prompt": record.prompt,
            "response": answer.content or "",
            "strategy": record.strategy,
            "parent_id": record.parent_id,
            "teacher_model": answer.model or teacher_name,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "created_at": datetime.fromtimestamp(created_at, tz=timezone.utc),
        }
        if config.teacher.generation.top_logprobs:
            row["top_logprobs"] = answer.top_logprobs
        rows.append(row)
    return rows, rejects


@task(name="filter-responses", cache_policy=NO_CACHE)
def filter_responses_task(rows: list[dict[str, Any]], config: DistillConfig):
    return filter_responses(rows, config.filters)


@task(name="write-dataset", cache_policy=NO_CACHE)
def write_dataset_task(
    config: DistillConfig, rows: list[dict[str, Any]], rejects: list[Reject], manifest: dict[str, Any], secrets: list[str]
) -> dict[str, Any]:
    return write_dataset(
        config.output_dir,
        rows,
        [r.to_row() for r in rejects],
        manifest,
        dataset_card(manifest),
        with_top_logprobs=bool(config.teacher.generation.top_logprobs),
        secrets=secrets,
    )


# -- flow -----------------------------------------------------------------------------------


@contextmanager
def client_bound_stage() -> Iterator[None]:
    """Interpreter settings for the teacher stage, where one event-loop thread issues every
    request and its CPU is the limit (restored afterwards):

    - a 50 ms GIL switch interval, so Prefect's bookkeeping threads do not preempt the loop
      every 5 ms (~10% throughput);
    - the objects alive so far (prompts, configs, Prefect state) are frozen out of the
      cyclic GC, which otherwise walks them on every full collection that the client's
      per-request garbage triggers (~10% throughput at 20k prompts).
    """
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(max(switch_interval, 0.05))
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch_interval)


def no_usable_answers_message(config: DistillConfig, asked: int, rejects: list[Reject], stage_name: str) -> str:
    """Why a run that asked the teacher `asked` prompts has no row to keep, and what to do."""
    reasons = Counter(reject.reason for reject in rejects)
    listed = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(5))
    example = next((r for r in rejects if r.reason == reasons.most_common(1)[0][0]), None) if rejects else None
    detail = f"; e.g. {example.detail[:300]}" if example is not None and example.detail else ""
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


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:60] or "dataset"


@flow(name="build-dataset")
def build_dataset(config: DistillConfig, prompt_column: str | None = None) -> dict[str, Any]:
    """Build a dataset of teacher answers from `config`; returns the manifest."""
    logger = get_run_logger()
    started = time.time()
    api_key = resolve_api_key(config.teacher.api_key_env) if config.teacher.backend == "openai" else None
    ledger = Ledger(config.output_dir / LEDGER_PATH)
    teacher = make_teacher(config, api_key)
    in_flight: deque = deque()
    label = config.name
    stage_seconds: dict[str, float] = {}

    def stop_teacher() -> None:  # on SIGINT/SIGTERM, from the signal watcher's thread
        teacher.abort(TeacherAborted("interrupted by a signal"))

    try:
        with cancel_on_interrupt(stop_teacher):
            with stage(stage_seconds, "load_seeds", label):
                seeds, seed_rejects = load_seeds_task(config, prompt_column)
                seeds, repeated_seeds = split_repeated_seeds(seeds)
                seed_rejects = seed_rejects + repeated_seeds
            with stage(stage_seconds, "generate_prompts", label):
                prompts, generation_rejects, prompt_report = generate_prompts_task(config, quote(seeds), teacher, ledger)
            for warning in prompt_report.get("warnings", []):
                logger.warning("%s", warning)
            with stage(stage_seconds, "filter_prompts", label):
                kept, prompt_rejects = filter_prompts_task(quote(prompts), config)
            logger.info("%d seeds, %d prompts generated, %d after prompt filters", len(seeds), len(prompts), len(kept))

            batch_results: list[tuple[list[dict[str, Any]], list[Reject]]] = []
            budget = FailureBudget(len(kept), config.teacher, on_exceeded=teacher.abort)
            batch_size = config.teacher.batch_size
            batches = [kept[start : start + batch_size] for start in range(0, len(kept), batch_size)]
            with (
                progress(f"{label} teacher", total=len(kept), unit="answered") as answered_bar,
                stage(stage_seconds, "teacher", label, answered_bar.status),
            ):
                if isinstance(teacher, OpenAITeacher):
                    with client_bound_stage():
                        # A few batch tasks in flight at once, so the shared `max_concurrency` never
                        # drains at a batch boundary; results are collected in batch order.
                        for batch_index, batch in enumerate(batches):
                            in_flight.append(
                                answer_batch_task.submit(
                                    batch_index, quote(batch), config, teacher, ledger, answered_bar, budget
                                )
                            )
                            if len(in_flight) >= BATCHES_IN_FLIGHT:
                                batch_results.append(in_flight.popleft().result())
                        while in_flight:
                            batch_results.append(in_flight.popleft().result())
                else:  # an in-process model answers one batch at a time
                    batch_results = [
                        answer_batch_task(batch_index, quote(batch), config, teacher, ledger, answered_bar, budget)
                        for batch_index, batch in enumerate(batches)
                    ]
            answered = [row for rows, _ in batch_results for row in rows]
            teacher_rejects = [reject for _, rejects in batch_results for reject in rejects]
            if kept and not answered:
                raise NoUsableAnswersError(no_usable_answers_message(config, len(kept), teacher_rejects, "teacher"))
            with stage(stage_seconds, "filter_responses", label):
                accepted, response_rejects = filter_responses_task(quote(answered), config)
            if answered and not accepted:
                raise NoUsableAnswersError(
                    no_usable_answers_message(config, len(answered), response_rejects, "filter_responses")
                )
    except BaseException as error:
        # Stop the other batches now (requests in flight are cancelled; every answer
        # received is already in the ledger), whatever stopped this one: a failed batch,
        # the failure budget, SIGINT (KeyboardInterrupt) or SIGTERM (Prefect's TerminationSignal).
        teacher.abort(error if isinstance(error, TeacherFatalError) else TeacherAborted(f"stopped: {error!r}"))
        if isinstance(error, TeacherFatalError):
            logger.error("%s", error)
        raise
    finally:
        for future in in_flight:  # after a failure: let the other batches stop first
            future.wait(timeout=30)
        if isinstance(teacher, OpenAITeacher):
            teacher.close()
        ledger.close()

    all_rejects = seed_rejects + generation_rejects + prompt_rejects + teacher_rejects + response_rejects
    entered = len(seed_rejects) + len(prompts) + len(generation_rejects)
    counts = {
        "seeds": len(seeds),
        "seeds_unused": prompt_report.get("seeds_unused", 0),
        "bad_seed_rows": len(seed_rejects),
        "prompts_generated": len(prompts),
        "generation_rejects": len(generation_rejects),
        "after_prompt_filters": len(kept),
        "teacher_answered": len(answered),
        "teacher_errors": len(teacher_rejects),
        "accepted": len(accepted),
        "rejected": len(all_rejects),
    }
    reject_reasons = dict(sorted(Counter(r.reason for r in all_rejects).items()))
    stats = teacher.stats
    usage = stats.to_dict()
    usage["paid_requests"] = stats.requests_sent
    pricing = config.teacher
    if pricing.price_per_million_prompt_tokens is not None or pricing.price_per_million_completion_tokens is not None:
        usage["estimated_cost_usd"] = round(
            stats.prompt_tokens * (pricing.price_per_million_prompt_tokens or 0) / 1e6
            + stats.completion_tokens * (pricing.price_per_million_completion_tokens or 0) / 1e6,
            6,
        )
    manifest = {
        "format_version": 1,
        "name": config.name,
        "distillflow_version": distillflow.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config.redacted(),
        "counts": counts,
        "reject_reasons": reject_reasons,
        "accepted_per_strategy": count_by(accepted, "strategy"),
        "prompt_report": prompt_report,
        "teacher_usage": usage,
        "teacher_failures": budget.summary(),
        "invariant": {
            "entered": entered,
            "accepted_plus_rejected": len(accepted) + len(all_rejects),
            "holds": entered == len(accepted) + len(all_rejects),
        },
        "elapsed_s": round(time.time() - started, 3),
        "stage_seconds": stage_seconds,
    }
    if not manifest["invariant"]["holds"]:
        raise RuntimeError(f"internal error: {entered} prompts entered but {len(accepted) + len(all_rejects)} rows out")
    manifest = write_dataset_task(config, quote(accepted), quote(all_rejects), manifest, [api_key] if api_key else [])

    table = [{"stage": stage, "reason": "", "count": value} for stage, value in counts.items()]
    table += [{"stage": "rejected", "reason": reason, "count": value} for reason, value in reject_reasons.items()]
    create_table_artifact(
        key=f"{_artifact_key(config.name)}-counts",
        table=table,
        description=f"{config.name}: rows per stage and reject reason",
    )
    from distillflow.prompts.report import report_markdown

    create_markdown_artifact(
        key=f"{_artifact_key(config.name)}-prompts",
        markdown=report_markdown(prompt_report),
        description=f"{config.name}: prompts per strategy and their diversity",
    )
    logger.info("wrote %d rows (%d rejects) to %s", len(accepted), len(all_rejects), config.output_dir)
    return manifest


def build_command(config_path: str | Path, prompt_column: str | None = None) -> dict[str, Any]:
    """`distill build CONFIG`: validate everything that can be checked before paying, then run."""
    from distillflow.tasks.preflight import preflight_build

    config = load_config(config_path)
    if config.teacher.backend == "openai":
        resolve_api_key(config.teacher.api_key_env)  # fail before any teacher call
    seeds, _ = load_seeds(config.seeds, prompt_column, config_path)  # bad files/columns fail here
    preflight_build(config, str(config_path), [seed.prompt for seed in seeds])  # a local teacher: its dir, template, context
    manifest = build_dataset(config, prompt_column)
    counts = manifest["counts"]
    print(
        f"{config.name}: {counts['accepted']} accepted, {counts['rejected']} rejected → {config.output_dir}",
        file=sys.stderr,
    )
    return manifest

"""The `build_dataset` flow: seeds → prompts → prompt filters → teacher → response filters → Parquet.

The flow only wires; each task does one coarse step (a batch of hundreds of prompts, with
async I/O inside), because each Prefect task run costs milliseconds of bookkeeping.
Tasks take NO_CACHE: their inputs are large lists whose hashing would cost more than
the work, and the durable cache of teacher answers is the ledger. Large lists are passed
`quote()`d, so Prefect does not walk every row looking for upstream futures.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.utilities.annotations import quote

import distillflow
from distillflow.config import DistillConfig, load_config
from distillflow.failures import failed_run, is_project_error
from distillflow.flows.shard_runs import answer_shards_on_pool
from distillflow.interrupt import cancel_on_interrupt
from distillflow.memory import release_freed_memory
from distillflow.progress import ProgressBar
from distillflow.records import BUDGET_REASON, PromptRecord, Reject
from distillflow.storage.ledger import TEACHER_LEDGER, Ledger
from distillflow.storage.seeds import load_seeds, split_repeated_seeds
from distillflow.tasks.build_steps import (
    BudgetTooSmallError,
    answer_batch_task,
    answer_shards_on_workers,
    budget_stop_message,
    budget_summary,
    client_bound_stage,
    filter_prompts_task,
    finish_dataset_task,
    generate_prompts_task,
    load_seeds_task,
    no_usable_answers_message,
    stage,
    write_shard_task,
)
from distillflow.tasks.shard_writer import ShardWriterProcess
from distillflow.tasks.shards import (
    BUILDING,
    BuildState,
    ShardCollector,
    ShardTotals,
    failure_summary,
    plan_fingerprint,
    read_shard_prompt_batches,
    shard_ranges,
    write_prompt_rejects,
    write_shard_prompts,
)
from distillflow.tasks.teacher.budget import FailureBudget
from distillflow.tasks.teacher.choose import make_teacher
from distillflow.tasks.teacher.errors import NoUsableAnswersError, TeacherAborted, TeacherFatalError
from distillflow.tasks.teacher.protocol import Teacher, resolve_api_key

BATCHES_IN_FLIGHT = 3
# The online teacher stage's first batch: this many prompts (at least `max_concurrency`),
# so its request keys and ledger lookup are done and the first requests go out within
# milliseconds of the stage's start, while the next, full-size batches are prepared.
FIRST_BATCH = 256
# From this many prompts on, the build filters and writes its shards in a child process
# (its start-up, ~1 s of the other core, pays off); smaller builds do it in this process.
SHARD_WRITER_MIN_PROMPTS = 4096
# From this many expected prompts on, an online HTTP teacher's requests go out from a
# client process of its own (tasks/teacher/pool.py), started while the prompt side runs.
CLIENT_PROCESS_MIN_PROMPTS = 4096


def shard_writer_wanted(config: DistillConfig, teacher: Teacher, prompts: int) -> bool:
    """Whether the build filters and writes its shards in the shard writer process: a
    teacher answering concurrent batches in this process (not fanned out to workers, not a
    local model answering one batch at a time), for at least `SHARD_WRITER_MIN_PROMPTS`."""
    return teacher.concurrent and not config.dataset.fans_out and prompts >= SHARD_WRITER_MIN_PROMPTS


def start_shard_writer(config: DistillConfig) -> ShardWriterProcess:
    return ShardWriterProcess(config.filters, config.output_dir / BUILDING, bool(config.teacher.generation.top_logprobs))


def requests_from_own_process(config: DistillConfig, expected_prompts: int) -> bool:
    """Whether the build's teacher issues its requests from a process of its own: an online
    HTTP teacher with one client process and no replicas, not fanned out to workers, for a
    build of at least `CLIENT_PROCESS_MIN_PROMPTS` prompts (`prompts.num_prompts`, else one
    per seed).
    In the flow's process, Prefect's task threads and the flow's bookkeeping take the request
    loop's interpreter lock from it; the child's start-up (~1 s) overlaps the prompt side."""
    teacher = config.teacher
    return (
        teacher.backend == "openai" and teacher.mode == "online" and teacher.client_processes == 1
        and not teacher.replicas and not config.dataset.fans_out and expected_prompts >= CLIENT_PROCESS_MIN_PROMPTS
    )


# -- tasks ----------------------------------------------------------------------------------


# -- flow -----------------------------------------------------------------------------------


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:60] or "dataset"


@flow(name="build-dataset")
def build_dataset(config: DistillConfig, prompt_column: str | None = None) -> dict[str, Any]:
    """Build a dataset of teacher answers from `config`, one shard at a time; returns the manifest.

    Prompt filters decide once over the whole prompt set; the kept prompts are answered in
    shards of `dataset.shard_rows`, each written as soon as it is complete (tasks/shards.py),
    and the dataset is swapped in, with the manifest last, when every shard is done.
    """
    logger = get_run_logger()
    started = time.time()
    api_key = resolve_api_key(config.teacher.api_key_env) if config.teacher.backend == "openai" else None
    ledger = Ledger(config.output_dir / TEACHER_LEDGER)
    teacher: Teacher | None = None  # made once the seeds tell how large the build is
    writer: ShardWriterProcess | None = None
    in_flight: deque = deque()  # (shard, last batch of its shard, future)
    label = config.name
    stage_seconds: dict[str, float] = {"write_shards": 0.0}
    staging = config.output_dir / BUILDING

    def stop_teacher() -> None:  # on SIGINT/SIGTERM, from the signal watcher's thread
        if teacher is not None:
            teacher.abort(TeacherAborted("interrupted by a signal"))

    try:
        with cancel_on_interrupt(stop_teacher):
            with stage(stage_seconds, "load_seeds", label):
                seeds, seed_rejects = load_seeds_task(config, prompt_column)
                seeds, repeated_seeds = split_repeated_seeds(seeds)
                seed_rejects = seed_rejects + repeated_seeds
            expected_prompts = config.prompts.num_prompts or len(seeds)
            teacher = make_teacher(config.teacher, api_key, own_process=requests_from_own_process(config, expected_prompts))
            if shard_writer_wanted(config, teacher, expected_prompts):
                writer = start_shard_writer(config)  # its start-up overlaps the prompt side
            with stage(stage_seconds, "generate_prompts", label):
                prompts, generation_rejects, prompt_report = generate_prompts_task(config, quote(seeds), teacher, ledger)
            num_seeds, num_prompts = len(seeds), len(prompts)
            del seeds  # the prompts hold what they need of them
            for warning in prompt_report.get("warnings", []):
                logger.warning("%s", warning)
            with stage(stage_seconds, "filter_prompts", label):
                kept, prompt_rejects = filter_prompts_task(quote(prompts), config)
            logger.info("%d seeds, %d prompts generated, %d after prompt filters", num_seeds, num_prompts, len(kept))
            before_teacher = seed_rejects + generation_rejects + prompt_rejects
            prompt_stage = {
                "bad_seed_rows": len(seed_rejects),
                "generation_rejects": len(generation_rejects),
                "reasons": Counter(reject.reason for reject in before_teacher),
            }
            del prompts, seed_rejects, generation_rejects, prompt_rejects  # only `kept` goes on

            plan = shard_ranges(len(kept), config.dataset.shard_rows)
            state, resumed = BuildState.open(config.output_dir, plan_fingerprint(kept, config, len(before_teacher)))
            state.set_prompt_rejects(write_prompt_rejects(staging, before_teacher, config.dataset.shard_rows))
            first_reject_file = len(state.prompt_reject_files)
            rejected_before_teacher = len(before_teacher)
            # From here on a shard's prompts are read from disk when it is answered.
            write_shard_prompts(staging, kept, plan, skip=state.finished)
            num_kept = len(kept)
            del before_teacher, kept
            release_freed_memory()
            if resumed:
                logger.info("resuming: %d of %d shards were already written", resumed, len(plan))

            progress = ProgressBar(
                f"{label} teacher", num_kept, "answered", artifact_key=f"{_artifact_key(config.name)}-teacher-progress"
            )
            if resumed:
                progress(sum(plan[index][1] - plan[index][0] for index in state.finished))
            budget = FailureBudget(num_kept, config.teacher, on_exceeded=teacher.abort)
            # In batch mode a shard is one Batch API job (the API takes up to 50,000 requests a file).
            batch_size = config.teacher.batch_size if config.teacher.mode == "online" else config.dataset.shard_rows
            fan_out = config.dataset.fans_out and teacher.concurrent
            # A large build filters and writes its shards in a process of its own
            # (tasks/shard_writer.py), off the request loop's interpreter lock; a small one here.
            if writer is None and shard_writer_wanted(config, teacher, num_kept):  # more prompts than expected
                writer = start_shard_writer(config)
            shards = writer if writer is not None else ShardCollector(
                config.filters, staging, bool(config.teacher.generation.top_logprobs)
            )

            first_batch = batch_size
            if config.teacher.mode == "online" and teacher.concurrent:
                first_batch = min(batch_size, max(FIRST_BATCH, config.teacher.max_concurrency))

            def batches() -> Iterator[tuple[int, bool, list[PromptRecord]]]:
                """(shard, whether it is the shard's last batch, prompts) of every unfinished
                shard, each batch made into records when its turn comes; the stage's first
                batch has `first_batch` prompts."""
                first = first_batch
                for index, (start, stop) in enumerate(plan):
                    if index in state.finished:
                        continue
                    if start == stop:
                        yield index, True, []
                        continue
                    sizes = [min(first, stop - start)]
                    sizes += [batch_size] * -(-(stop - start - sizes[0]) // batch_size)
                    first = batch_size
                    for number, batch in enumerate(read_shard_prompt_batches(staging, index, sizes)):
                        yield index, number == len(sizes) - 1, batch

            def collect(index: int, last: bool, result: tuple[list[dict[str, Any]], list[Reject]]) -> None:
                """A batch's answered rows and teacher rejects into its shard; the shard's files
                once its last batch is in (the response filters run on each batch as it comes
                in, so the last shard's files follow the last answer at once)."""
                shard_started = time.perf_counter()
                rows, teacher_rejects = result
                shards.add(index, rows, teacher_rejects)
                filtered(len(rows))
                if last:
                    start, stop = plan[index]
                    state.record(write_shard_task(index, stop - start, first_reject_file + index, quote(shards)))
                stage_seconds["write_shards"] += time.perf_counter() - shard_started

            # Answered rows through the response filters (here or in the shard writer); a
            # fan-out worker reports its own.
            filtered = ProgressBar("response filters", num_kept, "responses")
            with (
                progress.shown(),
                filtered.shown() if not fan_out else contextlib.nullcontext(),
                stage(stage_seconds, "teacher", label, progress.status),
            ):
                if fan_out and config.dataset.work_pool is not None:
                    answer_shards_on_pool(config, plan, state, first_reject_file, progress, teacher.stats)
                elif fan_out:
                    answer_shards_on_workers(config, plan, state, first_reject_file, progress, teacher.stats)
                elif teacher.concurrent:
                    with client_bound_stage():
                        # A few batch tasks in flight at once, so the shared `max_concurrency` never
                        # drains at a batch or shard boundary; results are collected in order, and a
                        # shard is written when its last batch is in.
                        for batch_index, (index, last, batch) in enumerate(batches()):
                            in_flight.append((index, last, answer_batch_task.submit(
                                batch_index, quote(batch), config, teacher, ledger, progress, budget
                            )))
                            if len(in_flight) >= BATCHES_IN_FLIGHT:
                                done_index, done_last, future = in_flight.popleft()
                                collect(done_index, done_last, future.result())
                        while in_flight:
                            done_index, done_last, future = in_flight.popleft()
                            collect(done_index, done_last, future.result())
                else:  # an in-process model answers one batch at a time
                    for batch_index, (index, last, batch) in enumerate(batches()):
                        collect(index, last, answer_batch_task(
                            batch_index, quote(batch), config, teacher, ledger, progress, budget
                        ))
            stage_seconds["write_shards"] = round(stage_seconds["write_shards"], 3)
            totals = ShardTotals.of(list(state.finished.values()))
            not_asked = totals.reject_reasons.get(BUDGET_REASON, 0)
            spending = getattr(teacher, "budget", None)
            stopped_by = "budget" if not_asked or (spending is not None and spending.exhausted) else None
            if stopped_by:
                logger.warning("%s", budget_stop_message(config, not_asked))
            if num_kept and not totals.answered and stopped_by:
                raise BudgetTooSmallError(
                    f"the budget (teacher.max_budget_usd={config.teacher.max_budget_usd}, teacher.max_total_tokens="
                    f"{config.teacher.max_total_tokens}) does not cover even the first request's worst case (prompt + "
                    f"generation.max_tokens={config.teacher.generation.max_tokens}): nothing was answered or written. "
                    "Raise the limit (`distill build --dry-run` shows what the run costs) or lower max_tokens."
                )
            if num_kept and not totals.answered:
                raise NoUsableAnswersError(
                    no_usable_answers_message(config, num_kept, totals.teacher_reasons, totals.examples, "teacher")
                )
            if totals.answered and not totals.accepted:
                raise NoUsableAnswersError(
                    no_usable_answers_message(
                        config, totals.answered, totals.response_reasons, totals.examples, "filter_responses"
                    )
                )
    except BaseException as error:
        # Stop the other batches now (requests in flight are cancelled; every answer
        # received is already in the ledger), whatever stopped this one: a failed batch,
        # the failure budget, SIGINT (KeyboardInterrupt) or SIGTERM (Prefect's TerminationSignal).
        if teacher is not None:
            teacher.abort(error if isinstance(error, TeacherFatalError) else TeacherAborted(f"stopped: {error!r}"))
        if is_project_error(error):
            return failed_run(error)  # type: ignore[no-any-return]  # the paragraph, once, as the run's message
        raise
    finally:
        for _, _, future in in_flight:  # after a failure: let the other batches stop first
            future.wait(timeout=30)
        if writer is not None:
            writer.close()
        if teacher is not None:
            teacher.close()
        ledger.close()

    reject_reasons = prompt_stage["reasons"] + totals.reject_reasons
    rejected = rejected_before_teacher + sum(totals.reject_reasons.values())
    entered = prompt_stage["bad_seed_rows"] + num_prompts + prompt_stage["generation_rejects"]
    counts = {
        "seeds": num_seeds,
        "seeds_unused": prompt_report.get("seeds_unused", 0),
        "bad_seed_rows": prompt_stage["bad_seed_rows"],
        "prompts_generated": num_prompts,
        "generation_rejects": prompt_stage["generation_rejects"],
        "after_prompt_filters": num_kept,
        "teacher_answered": totals.answered,
        "teacher_errors": totals.teacher_errors,
        "accepted": totals.accepted,
        "rejected": rejected,
    }
    reject_reasons = dict(sorted(reject_reasons.items()))
    stats = teacher.stats
    usage = stats.to_dict()
    usage["paid_requests"] = stats.requests_sent
    usage["mode"] = config.teacher.mode
    pricing = config.teacher.pricing
    if pricing is not None:
        # What this run paid (answers from the ledger are free), at the price table's rates.
        usage["estimated_cost_usd"] = round(
            pricing.cost_usd(stats.prompt_tokens, stats.completion_tokens, batch=config.teacher.mode == "batch"), 6
        )
    manifest = {
        "format_version": 1,
        "name": config.name,
        "distillflow_version": distillflow.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config.redacted(),
        "counts": counts,
        "reject_reasons": reject_reasons,
        "accepted_per_strategy": dict(sorted(totals.accepted_per_strategy.items())),
        "prompt_report": prompt_report,
        "teacher_usage": usage,
        "teacher_failures": (
            failure_summary(totals, num_kept, config.teacher.max_error_rate) if fan_out else budget.summary()
        ),
        "build": {"shard_rows": config.dataset.shard_rows, "shards": len(plan), "resumed_shards": resumed},
        "stopped_by": stopped_by,
        "budget": budget_summary(config, usage, not_asked),
        "invariant": {
            "entered": entered,
            "accepted_plus_rejected": totals.accepted + rejected,
            "holds": entered == totals.accepted + rejected,
        },
        "elapsed_s": round(time.time() - started, 3),
        "stage_seconds": stage_seconds,
    }
    if not manifest["invariant"]["holds"]:
        raise RuntimeError(f"internal error: {entered} prompts entered but {totals.accepted + rejected} rows out")
    manifest = finish_dataset_task(config, state.shards(), manifest, [api_key] if api_key else [])

    table = [{"stage": stage, "reason": "", "count": value} for stage, value in counts.items()]
    table += [{"stage": "rejected", "reason": reason, "count": value} for reason, value in reject_reasons.items()]
    create_table_artifact(
        key=f"{_artifact_key(config.name)}-counts",
        table=table,
        description=f"{config.name}: rows per stage and reject reason",
    )
    from distillflow.tasks.artifact_charts import build_summary_markdown, dataset_lengths

    create_markdown_artifact(
        key=f"{_artifact_key(config.name)}-summary",
        markdown=build_summary_markdown(manifest, dataset_lengths(config.output_dir)),
        description=f"{config.name}: counts per stage, reason and strategy, teacher usage and cost, lengths",
    )
    from distillflow.prompts.report import report_markdown

    create_markdown_artifact(
        key=f"{_artifact_key(config.name)}-prompts",
        markdown=report_markdown(prompt_report),
        description=f"{config.name}: prompts per strategy and their diversity",
    )
    logger.info("wrote %d rows (%d rejects) to %s", totals.accepted, rejected, config.output_dir)
    return manifest


def dry_run_command(config_path: str | Path, prompt_column: str | None = None) -> dict[str, Any]:
    """`distill build CONFIG --dry-run`: prompt count, tokens and cost; no request, no dataset."""
    from distillflow.tasks.cost_estimate import estimate_build, format_estimate

    config = load_config(config_path)
    seeds, _ = load_seeds(config.seeds, prompt_column, config_path)
    estimate = estimate_build(config, seeds)
    print(format_estimate(config, estimate, config_path))
    return estimate


def build_command(config_path: str | Path, prompt_column: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """`distill build CONFIG`: validate everything that can be checked before paying, then run."""
    from distillflow.tasks.preflight import preflight_build

    if dry_run:
        return dry_run_command(config_path, prompt_column)
    config = load_config(config_path)
    if config.teacher.backend == "openai":
        resolve_api_key(config.teacher.api_key_env)  # fail before any teacher call
    seeds, _ = load_seeds(config.seeds, prompt_column, config_path)  # bad files/columns fail here
    preflight_build(config, str(config_path), [seed.prompt for seed in seeds])  # a local teacher: its dir, template, context
    manifest = build_dataset(config, prompt_column)
    counts = manifest["counts"]
    stopped = " (stopped by the budget: rerun with a larger limit to continue)" if manifest.get("stopped_by") else ""
    print(
        f"{config.name}: {counts['accepted']} accepted, {counts['rejected']} rejected → {config.output_dir}{stopped}",
        file=sys.stderr,
    )
    return manifest

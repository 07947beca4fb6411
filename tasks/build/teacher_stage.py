"""The build's teacher stage: every unfinished shard of a `ShardPlan` answered by the teacher
(ledger first), through the response filters, and written. One contract over the ways a
build can run it, `TeacherStage.answer(plan, stage_seconds)` → the finished shards, with
its implementations chosen once from the config by `teacher_stage`:

- `BatchesInProcess`: the shards' prompts asked in batches from the build's process. An
  online HTTP teacher of a large build sends the requests from a client process of its own
  (tasks/teacher/pool.py, started here, while the prompt side runs); a teacher that takes
  concurrent batches has `BATCHES_IN_FLIGHT` of them in flight, a local model answers one
  at a time. The response filters and shard files run here, or for a large build in the
  shard writer process (tasks/build/shard_writer.py);
- `ShardsOnWorkers`: each shard whole on a worker with a teacher client of its own
  (tasks/build/shards.py `answer_shard`): one task on Dask workers (`dataset.workers`,
  `dataset.dask_address`), or one `build-shard` flow run on a Prefect work pool
  (`dataset.work_pool`, tasks/build/shard_pool.py).

Each records every shard in the build's `BuildState` the moment it is written, so a crash
resumes after it.
"""

from __future__ import annotations

import functools
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prefect.utilities.annotations import quote

from distillflow.config import DistillConfig
from distillflow.progress import ProgressBar
from distillflow.records import PromptRecord, Reject
from distillflow.storage.ledger import Ledger
from distillflow.storage.parquet import AnsweredRow
from distillflow.tasks.build.shard_pool import answer_shards_on_pool
from distillflow.tasks.build.shard_writer import ShardWriterProcess
from distillflow.tasks.build.shards import (
    BUILDING,
    ShardCollector,
    ShardPlan,
    ShardResult,
    ShardTotals,
    failure_summary,
    read_shard_prompt_batches,
)
from distillflow.tasks.build.steps import (
    answer_batch_task,
    answer_shards_on_workers,
    client_bound_stage,
    stage,
    write_shard_task,
)
from distillflow.tasks.teacher.budget import FailureBudget
from distillflow.tasks.teacher.choose import make_teacher
from distillflow.tasks.teacher.protocol import Teacher

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


def dataset_artifact_key(name: str) -> str:
    """The prefix of a build's artifact keys, from the dataset's name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:60] or "dataset"


def teacher_progress(config: DistillConfig, plan: ShardPlan) -> ProgressBar:
    """The stage's progress bar (answered prompts), with the resumed shards counted."""
    key = f"{dataset_artifact_key(config.name)}-teacher-progress"
    progress = ProgressBar(f"{config.name} teacher", plan.prompts, "answered", artifact_key=key)
    if plan.resumed:
        progress(sum(plan.ranges[index][1] - plan.ranges[index][0] for index in plan.state.finished))
    return progress


class TeacherStage(Protocol):
    """What the build asks of its teacher stage."""

    teacher: Teacher  # the build's teacher: prompt generation asks it too; a signal aborts it

    def answer(self, plan: ShardPlan, stage_seconds: dict[str, float]) -> list[ShardResult]:
        """Answer, filter and write every unfinished shard of `plan` (timed into
        `stage_seconds`); every finished shard of the plan."""

    def failures(self, totals: ShardTotals, prompts: int) -> dict[str, Any]:
        """The manifest's `teacher_failures`: how many of the `prompts` failed, and why."""

    def close(self) -> None:
        """After the stage, or a failure: let batches in flight stop, end child processes,
        close the teacher."""


def teacher_stage(
    config: DistillConfig, api_key: str | None, ledger: Ledger, expected_prompts: int, shard_flow: Any
) -> TeacherStage:
    """The teacher stage `config` asks for, with its teacher; `expected_prompts`: how many
    prompts the build expects (`prompts.num_prompts`, else one per seed); `shard_flow`: the
    flow a work-pool worker runs for one shard (flows/shard_runs.py `build_shard`)."""
    teacher = make_teacher(config.teacher, api_key, own_process=requests_from_own_process(config, expected_prompts))
    try:
        if not (config.dataset.fans_out and teacher.concurrent):
            return BatchesInProcess(config, teacher, ledger, expected_prompts)
    except BaseException:
        teacher.close()
        raise
    if config.dataset.work_pool is not None:
        return ShardsOnWorkers(config, teacher, functools.partial(answer_shards_on_pool, shard_flow=shard_flow))
    return ShardsOnWorkers(config, teacher, answer_shards_on_workers)


def requests_from_own_process(config: DistillConfig, expected_prompts: int) -> bool:
    """Whether the build's teacher issues its requests from a process of its own: an online
    HTTP teacher with one client process and no replicas, not fanned out to workers, for a
    build of at least `CLIENT_PROCESS_MIN_PROMPTS` prompts.
    In the flow's process, Prefect's task threads and the flow's bookkeeping take the request
    loop's interpreter lock from it; the child's start-up (~1 s) overlaps the prompt side."""
    teacher = config.teacher
    return (
        teacher.backend == "openai" and teacher.mode == "online" and teacher.client_processes == 1
        and not teacher.replicas and not config.dataset.fans_out and expected_prompts >= CLIENT_PROCESS_MIN_PROMPTS
    )


def shard_writer_wanted(config: DistillConfig, teacher: Teacher, prompts: int) -> bool:
    """Whether the build filters and writes its shards in the shard writer process: a
    teacher answering concurrent batches in this process (not fanned out to workers, not a
    local model answering one batch at a time), for at least `SHARD_WRITER_MIN_PROMPTS`."""
    return teacher.concurrent and not config.dataset.fans_out and prompts >= SHARD_WRITER_MIN_PROMPTS


def start_shard_writer(config: DistillConfig) -> ShardWriterProcess:
    return ShardWriterProcess(config.filters, config.output_dir / BUILDING, bool(config.teacher.generation.top_logprobs))


class BatchesInProcess:
    """Batches asked from this process; each shard written when its last batch is in."""

    def __init__(self, config: DistillConfig, teacher: Teacher, ledger: Ledger, expected_prompts: int) -> None:
        self.config, self.teacher, self.ledger = config, teacher, ledger
        self.budget: FailureBudget | None = None
        self.in_flight: deque = deque()  # (shard, last batch of its shard, future)
        # A large build filters and writes its shards in a process of its own
        # (tasks/build/shard_writer.py), off the request loop's interpreter lock; its start-up
        # overlaps the prompt side. A small one does it here.
        self.writer = start_shard_writer(config) if shard_writer_wanted(config, teacher, expected_prompts) else None

    def answer(self, plan: ShardPlan, stage_seconds: dict[str, float]) -> list[ShardResult]:
        config, teacher = self.config, self.teacher
        progress = teacher_progress(config, plan)
        self.budget = FailureBudget(plan.prompts, config.teacher, on_exceeded=teacher.abort)
        # In batch mode a shard is one Batch API job (the API takes up to 50,000 requests a file).
        batch_size = config.teacher.batch_size if config.teacher.mode == "online" else config.dataset.shard_rows
        if self.writer is None and shard_writer_wanted(config, teacher, plan.prompts):  # more prompts than expected
            self.writer = start_shard_writer(config)
        shards = self.writer if self.writer is not None else ShardCollector(
            config.filters, config.output_dir / BUILDING, bool(config.teacher.generation.top_logprobs)
        )
        first_batch = batch_size
        if config.teacher.mode == "online" and teacher.concurrent:
            first_batch = min(batch_size, max(FIRST_BATCH, config.teacher.max_concurrency))
        # Answered rows through the response filters (here or in the shard writer).
        filtered = ProgressBar("response filters", plan.prompts, "responses")

        def collect(index: int, last: bool, result: tuple[list[AnsweredRow], list[Reject]]) -> None:
            """A batch's answered rows and teacher rejects into its shard; the shard's files
            once its last batch is in (the response filters run on each batch as it comes
            in, so the last shard's files follow the last answer at once)."""
            shard_started = time.perf_counter()
            rows, teacher_rejects = result
            shards.add(index, rows, teacher_rejects)
            filtered(len(rows))
            if last:
                start, stop = plan.ranges[index]
                plan.state.record(write_shard_task(index, stop - start, plan.first_reject_file + index, quote(shards)))
            stage_seconds["write_shards"] += time.perf_counter() - shard_started

        with progress.shown(), filtered.shown(), stage(stage_seconds, "teacher", config.name, progress.status):
            if teacher.concurrent:
                with client_bound_stage():
                    # A few batch tasks in flight at once, so the shared `max_concurrency` never
                    # drains at a batch or shard boundary; results are collected in order, and a
                    # shard is written when its last batch is in.
                    for batch_index, (index, last, batch) in enumerate(self.batches(plan, batch_size, first_batch)):
                        self.in_flight.append((index, last, answer_batch_task.submit(
                            batch_index, quote(batch), config, teacher, self.ledger, progress, self.budget
                        )))
                        if len(self.in_flight) >= BATCHES_IN_FLIGHT:
                            done_index, done_last, future = self.in_flight.popleft()
                            collect(done_index, done_last, future.result())
                    while self.in_flight:
                        done_index, done_last, future = self.in_flight.popleft()
                        collect(done_index, done_last, future.result())
            else:  # an in-process model answers one batch at a time
                for batch_index, (index, last, batch) in enumerate(self.batches(plan, batch_size, first_batch)):
                    collect(index, last, answer_batch_task(
                        batch_index, quote(batch), config, teacher, self.ledger, progress, self.budget
                    ))
        stage_seconds["write_shards"] = round(stage_seconds["write_shards"], 3)
        return plan.results()

    def batches(
        self, plan: ShardPlan, batch_size: int, first_batch: int
    ) -> Iterator[tuple[int, bool, list[PromptRecord]]]:
        """(shard, whether it is the shard's last batch, prompts) of every unfinished
        shard, each batch made into records when its turn comes; the stage's first
        batch has `first_batch` prompts."""
        first = first_batch
        for index, (start, stop) in enumerate(plan.ranges):
            if index in plan.state.finished:
                continue
            if start == stop:
                yield index, True, []
                continue
            sizes = [min(first, stop - start)]
            sizes += [batch_size] * -(-(stop - start - sizes[0]) // batch_size)
            first = batch_size
            for number, batch in enumerate(read_shard_prompt_batches(self.config.output_dir / BUILDING, index, sizes)):
                yield index, number == len(sizes) - 1, batch

    def failures(self, totals: ShardTotals, prompts: int) -> dict[str, Any]:
        assert self.budget is not None, "the stage has not run"
        return self.budget.summary()

    def close(self) -> None:
        for _, _, future in self.in_flight:  # after a failure: let the other batches stop first
            future.wait(timeout=30)
        if self.writer is not None:
            self.writer.close()
        self.teacher.close()


class ShardsOnWorkers:
    """Each shard answered, filtered and written whole by a worker with a teacher client of
    its own: `answer_shards` is `answer_shards_on_workers` (Dask) or `answer_shards_on_pool`
    (a Prefect work pool)."""

    def __init__(self, config: DistillConfig, teacher: Teacher, answer_shards: Callable[..., None]) -> None:
        self.config, self.teacher, self.answer_shards = config, teacher, answer_shards

    def answer(self, plan: ShardPlan, stage_seconds: dict[str, float]) -> list[ShardResult]:
        progress = teacher_progress(self.config, plan)  # a worker reports its own response filters
        with progress.shown(), stage(stage_seconds, "teacher", self.config.name, progress.status):
            # The workers' usage is added to the build's teacher's stats.
            self.answer_shards(self.config, plan, progress, self.teacher.stats)
        return plan.results()

    def failures(self, totals: ShardTotals, prompts: int) -> dict[str, Any]:
        """From the shards' teacher rejects: each worker keeps its own failure budget."""
        return failure_summary(totals, prompts, self.config.teacher.max_error_rate)

    def close(self) -> None:
        self.teacher.close()

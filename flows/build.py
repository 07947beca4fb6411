"""The `build_dataset` flow: seeds → prompts → prompt filters → teacher → response filters → Parquet.

The flow only wires; each task does one coarse step (a batch of hundreds of prompts, with
async I/O inside), because each Prefect task run costs milliseconds of bookkeeping.
Tasks take NO_CACHE: their inputs are large lists whose hashing would cost more than
the work, and the durable cache of teacher answers is the ledger. Large lists are passed
`quote()`d, so Prefect does not walk every row looking for upstream futures. The teacher
stage is one object (tasks/build/teacher_stage.py), chosen from the config: batches from this
process, or shards on Dask workers or on a work pool.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.utilities.annotations import quote

from distillflow import runs
from distillflow.config import DistillConfig, load_config
from distillflow.failures import failed_run, is_project_error
from distillflow.flows.shard_runs import build_shard
from distillflow.interrupt import cancel_on_interrupt
from distillflow.memory import release_freed_memory
from distillflow.runs import get_run_logger
from distillflow.storage.ledger import TEACHER_LEDGER, Ledger
from distillflow.storage.lock import OutputInUse, output_lock
from distillflow.storage.manifest import Manifest
from distillflow.storage.seeds import SeedRows, load_seeds
from distillflow.tasks.build.shards import ShardTotals, plan_shards
from distillflow.tasks.build.steps import (
    PromptSide,
    check_teacher_stage,
    dataset_manifest,
    filter_prompts_task,
    finish_dataset_task,
    generate_prompts_task,
    load_seeds_task,
    stage,
)
from distillflow.tasks.build.teacher_stage import TeacherStage, dataset_artifact_key, teacher_stage
from distillflow.tasks.teacher.errors import TeacherAborted, TeacherFatalError
from distillflow.tasks.teacher.protocol import resolve_api_key


@flow(name="build-dataset")
def build_dataset(
    config: DistillConfig, prompt_column: str | None = None, seed_rows: SeedRows | None = None
) -> dict[str, Any]:
    """Build a dataset of teacher answers from `config`, one shard at a time; returns the manifest.
    `seed_rows`: the seed files as the caller read them already (`build_command`), or None.

    Prompt filters decide once over the whole prompt set; the kept prompts are answered in
    shards of `dataset.shard_rows`, each written as soon as it is complete (tasks/build/shards.py),
    and the dataset is swapped in, with the manifest last, when every shard is done. The run
    holds `config.output_dir` (storage/lock.py): a second run on it is refused, not interleaved.
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(output_lock(config.output_dir, f"the build of {config.name!r}"))
        except OutputInUse as error:
            return failed_run(error)  # type: ignore[no-any-return]
        return _build(config, prompt_column, seed_rows)


def _build(config: DistillConfig, prompt_column: str | None, seed_rows: SeedRows | None) -> dict[str, Any]:
    """The build itself, with the output directory held."""
    logger = get_run_logger()
    started = time.time()
    api_key = resolve_api_key(config.teacher.api_key_env) if config.teacher.backend == "openai" else None
    ledger = Ledger(config.output_dir / TEACHER_LEDGER)
    answering: TeacherStage | None = None  # made once the seeds tell how large the build is
    label = config.name
    stage_seconds: dict[str, float] = {"write_shards": 0.0}

    def stop_teacher() -> None:  # on SIGINT/SIGTERM, from the signal watcher's thread
        if answering is not None:
            answering.teacher.abort(TeacherAborted("interrupted by a signal"))

    try:
        with cancel_on_interrupt(stop_teacher):
            with stage(stage_seconds, "load_seeds", label):
                seeds, seed_rejects = load_seeds_task(config, prompt_column, seed_rows)
            answering = teacher_stage(config, api_key, ledger, config.prompts.num_prompts or len(seeds), build_shard)
            with stage(stage_seconds, "generate_prompts", label):
                prompts, generation_rejects, report = generate_prompts_task(config, quote(seeds), answering.teacher, ledger)
            num_seeds = len(seeds)
            del seeds  # the prompts hold what they need of them
            for warning in report.get("warnings", []):
                logger.warning("%s", warning)
            with stage(stage_seconds, "filter_prompts", label):
                kept, prompt_rejects = filter_prompts_task(quote(prompts), config)
            logger.info("%d seeds, %d prompts generated, %d after prompt filters", num_seeds, len(prompts), len(kept))
            prompt_side = PromptSide.of(num_seeds, len(prompts), seed_rejects, generation_rejects, prompt_rejects, report)
            del prompts  # only `kept` goes on
            plan = plan_shards(config, kept, seed_rejects + generation_rejects + prompt_rejects)
            del kept, seed_rejects, generation_rejects, prompt_rejects  # shards read their prompts from disk
            release_freed_memory()
            if plan.resumed:
                logger.info("resuming: %d of %d shards were already written", plan.resumed, len(plan.ranges))
            totals = ShardTotals.of(answering.answer(plan, stage_seconds))
            stopped_by, not_asked = check_teacher_stage(config, answering.teacher, totals, plan.prompts)
    except BaseException as error:
        # Stop the other batches now (requests in flight are cancelled; every answer
        # received is already in the ledger), whatever stopped this one: a failed batch,
        # the failure budget, SIGINT (KeyboardInterrupt) or SIGTERM (Prefect's TerminationSignal).
        if answering is not None:
            answering.teacher.abort(error if isinstance(error, TeacherFatalError) else TeacherAborted(f"stopped: {error!r}"))
        if is_project_error(error):
            return failed_run(error)  # type: ignore[no-any-return]  # the paragraph, once, as the run's message
        raise
    finally:
        if answering is not None:
            answering.close()  # after a failure: batches in flight stop first; child processes end
        ledger.close()

    build = {"shard_rows": config.dataset.shard_rows, "shards": len(plan.ranges), "resumed_shards": plan.resumed}
    manifest = dataset_manifest(
        config, prompt_side, plan.prompts, totals, answering.teacher.stats, answering.failures(totals, plan.prompts),
        build, stopped_by, not_asked, round(time.time() - started, 3), stage_seconds,
    )
    manifest = finish_dataset_task(config, plan.state.shards(), manifest, [api_key] if api_key else [])
    publish_build_artifacts(config, manifest)
    logger.info("wrote %d rows (%d rejects) to %s", totals.accepted, Manifest.of(manifest).rejected, config.output_dir)
    return manifest


def publish_build_artifacts(config: DistillConfig, manifest: dict[str, Any]) -> None:
    """The build's Prefect artifacts: rows per stage and reject reason, a summary, the prompts."""
    if not runs.keeps_artifacts():  # no server: the dataset card and inspect show the same
        return
    from distillflow.prompts.report import report_markdown
    from distillflow.tasks.artifact_charts import build_summary_markdown, dataset_lengths

    key = dataset_artifact_key(config.name)
    written = Manifest.of(manifest)
    table = [{"stage": stage, "reason": "", "count": value} for stage, value in written.counts.items()]
    table += [{"stage": "rejected", "reason": reason, "count": value} for reason, value in written.reject_reasons.items()]
    create_table_artifact(
        key=f"{key}-counts", table=table, description=f"{config.name}: rows per stage and reject reason"
    )
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=build_summary_markdown(written, dataset_lengths(config.output_dir)),
        description=f"{config.name}: counts per stage, reason and strategy, teacher usage and cost, lengths",
    )
    create_markdown_artifact(
        key=f"{key}-prompts",
        markdown=report_markdown(written.prompt_report),
        description=f"{config.name}: prompts per strategy and their diversity",
    )
def dry_run_command(config_path: str | Path, prompt_column: str | None = None) -> dict[str, Any]:
    """`distill build CONFIG --dry-run`: prompt count, tokens and cost; no request, no dataset."""
    from distillflow.tasks.build.cost_estimate import estimate_build, format_estimate

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
    if config.dataset.fans_out:
        runs.require_prefect("a build whose shards fan out (dataset.workers, dataset.work_pool)")
    seeds = SeedRows(*load_seeds(config.seeds, prompt_column, config_path))  # bad files/columns fail here
    preflight_build(config, str(config_path), [seed.prompt for seed in seeds.prompts])  # a local teacher: its dir, template, context
    manifest = build_dataset(config, prompt_column, seeds)
    written = Manifest.of(manifest)
    stopped = " (stopped by the budget: rerun with a larger limit to continue)" if written.stopped_by else ""
    print(
        f"{config.name}: {written.accepted} accepted, {written.rejected} rejected → {config.output_dir}{stopped}",
        file=sys.stderr,
    )
    return manifest

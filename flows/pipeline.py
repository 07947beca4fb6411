"""`distill run CONFIG`: build → (capture logits for kd_topk, kd_greybox) → train → eval, as one parent flow
(its deployment, with those of every other flow, is in flows/deployments.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from distillflow import runs
from distillflow.config import load_config
from distillflow.failures import fail_cleanly
from distillflow.flows.build import build_dataset
from distillflow.runs import get_run_logger
from distillflow.storage.seeds import SeedRows, load_seeds
from distillflow.tasks.teacher.protocol import resolve_api_key


@flow(name="distill-pipeline")
def run_pipeline(config_path: str, seed_rows: SeedRows | None = None) -> dict[str, Any]:
    """Every stage the config asks for, each as a subflow visible in the UI: build →
    (capture-logits) → train → eval → (mine: hard prompts, retrain, eval again).
    `seed_rows`: the seed files as `run_command` read them already, or None."""
    return fail_cleanly(run_stages, config_path, seed_rows)  # type: ignore[no-any-return]


def run_stages(config_path: str, seed_rows: SeedRows | None = None) -> dict[str, Any]:
    """The stages of `run_pipeline`, in order, inside its flow run."""
    logger = get_run_logger()
    config = load_config(config_path)
    result: dict[str, Any] = {"dataset": build_dataset(config, None, seed_rows)["counts"]}
    if config.training is None:
        logger.info("no `training:` section: no student to train")
    else:
        if config.training.objective in ("kd_topk", "kd_greybox") and getattr(config, "capture", None) is not None:
            from distillflow.flows.capture_logits import capture_logits_command

            result["capture"] = capture_logits_command(config_path)
        from distillflow.flows.train import train

        result["training"] = train(str(config_path))
    if config.evaluation is not None:
        from distillflow.flows.evaluate import evaluate

        result["evaluation"] = evaluate(str(config_path))["table"]
    if config.mining is not None:
        from distillflow.flows.mine import mine

        # The student just trained is the one mined against; the new dataset version trains
        # and evaluates a student again (mining.retrain).
        result["mining"] = mine(str(config_path))
    return result


def run_command(config_path: str | Path) -> dict[str, Any]:
    """Check every stage the config asks for (tasks/preflight.py), then run the pipeline."""
    from distillflow.tasks.preflight import preflight_run

    config = load_config(config_path)
    if config.teacher.backend == "openai":
        resolve_api_key(config.teacher.api_key_env)
    if config.dataset.fans_out:
        runs.require_prefect("a build whose shards fan out (dataset.workers, dataset.work_pool)")
    seeds = SeedRows(*load_seeds(config.seeds, None, config_path))  # read once: the build takes them
    preflight_run(config, str(config_path), [seed.prompt for seed in seeds.prompts])
    return run_pipeline(str(config_path), seeds)

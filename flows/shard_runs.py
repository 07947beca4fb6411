"""The `build-shard` flow: one shard of a build on a Prefect work-pool worker
(`prefect worker start --pool POOL --type process`, on any machine).

The parent build's teacher stage (tasks/build/teacher_stage.py, `dataset.work_pool`) registers
this flow's deployment and keeps `dataset.workers` runs of it in flight
(tasks/build/shard_pool.py, which also adopts or cancels the runs a killed build left behind).
A run reads its shard's prompts from `output_dir/.building/`, answers them with its own
teacher client and its own connection to the run's ledger, runs the response filters,
writes the shard's files and, last, `.building/results/shard-k.json`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from distillflow.config import DistillConfig
from distillflow.storage.atomic import write_json_atomic
from distillflow.storage.ledger import TEACHER_LEDGER
from distillflow.tasks.build import shard_pool
from distillflow.tasks.build.shard_pool import SHARD_FLOW, ensure_process_pool, result_path
from distillflow.tasks.build.shards import answer_shard

__all__ = ["build_shard", "ensure_process_pool", "register_shard_deployment"]


@flow(name=SHARD_FLOW, flow_run_name="shard-{index}")
def build_shard(config: DistillConfig, index: int, reject_file: int) -> dict[str, Any]:
    """One shard of a build on a work-pool worker: its prompts from `.building/prompts/`,
    the teacher (ledger first), the response filters, its files, then its result file."""
    result = answer_shard(index, config, reject_file, Path(config.output_dir) / TEACHER_LEDGER)
    write_json_atomic(result_path(config.output_dir, index), asdict(result))
    return {"index": index, "prompts": result.prompts, "accepted": result.accepted}


def register_shard_deployment(config: DistillConfig) -> str:
    """The `build-shard/NAME` deployment of this flow on `dataset.work_pool`; its name."""
    return shard_pool.register_shard_deployment(config, build_shard)

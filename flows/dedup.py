"""`distill dedup IN_DIR OUT_DIR`: the filtering stage alone, on an existing dataset.

The flow only wires the three passes of `tasks.filters.dataset`: one `shard-features` task
per input shard (the map, submitted together so the task runner runs them in parallel),
one `resolve-filters` task (the global reduce), one `write-filtered` task. With the
default thread-pool runner the shards run on local threads (the MinHash kernel releases
the GIL); with `DaskTaskRunner` (prefect-dask) or `RayTaskRunner` (prefect-ray) the same
flow spreads the map over a cluster, and only the compact features travel back.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, unmapped

from distillflow import runs
from distillflow.runs import get_run_logger
from distillflow.storage.manifest import Manifest
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.dataset import (
    filter_dataset,
    filters_config_for,
    input_shards,
    resolve_filters_task,
    shard_features_task,
    write_filtered_task,
)

Engine = Literal["prefect", "dask", "local"]


@flow(name="dedup-dataset")
def dedup_flow(in_dir: str, out_dir: str, config: FiltersConfig) -> dict[str, Any]:
    """Filter the dataset in `in_dir` into `out_dir`; returns the new manifest."""
    from distillflow.tasks.build.steps import stage  # a stage running past a minute says so

    logger = get_run_logger()
    started = time.time()
    stage_seconds: dict[str, float] = {}
    label = Path(out_dir).name
    paths = [str(p) for p in input_shards(in_dir)]
    with stage(stage_seconds, "shard_features", label):
        futures = shard_features_task.map(paths, config=unmapped(config))
        shards = [future.result() for future in futures]
    with stage(stage_seconds, "resolve_filters", label):
        decisions = resolve_filters_task(shards, config)
    del shards
    with stage(stage_seconds, "write", label):
        manifest = write_filtered_task(in_dir, out_dir, paths, decisions, config, time.time() - started)
    logger.info("%s: %s", out_dir, Manifest.of(manifest).counts)
    return manifest


def dedup_command(
    in_dir: str | Path,
    out_dir: str | Path,
    config_path: str | Path | None = None,
    engine: Engine = "prefect",
    dask_address: str | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """`distill dedup IN_DIR OUT_DIR [--config C]`: run the filters alone on a dataset.

    engine: `prefect` (flow, thread-pool task runner), `dask` (flow on a Dask cluster at
    `dask_address`, or a local one with `workers` processes), `local` (no Prefect).
    """
    from distillflow.config import ConfigError

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    config = filters_config_for(in_dir, config_path)
    if not (in_dir / "data").is_dir():
        raise ConfigError(f"{in_dir}: not a dataset directory (no data/ inside); pass the output_dir of a build")
    if out_dir.resolve() == in_dir.resolve():
        raise ConfigError("OUT_DIR must differ from IN_DIR (the input is read again while the output is written)")
    if engine == "local":
        manifest = filter_dataset(in_dir, out_dir, config)
    elif engine == "dask":
        from prefect_dask import DaskTaskRunner

        runs.require_prefect("distill dedup --engine dask")

        runner = (
            DaskTaskRunner(address=dask_address)
            if dask_address
            else DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
        )
        manifest = dedup_flow.with_options(task_runner=runner)(str(in_dir), str(out_dir), config)
    else:
        manifest = dedup_flow(str(in_dir), str(out_dir), config)
    written = Manifest.of(manifest, f"{out_dir}/manifest.json")
    reasons = ", ".join(f"{k} {v}" for k, v in written.filter_reject_reasons.items()) or "none"
    print(
        f"{in_dir} → {out_dir}: {written.accepted} of {written.counts['input_rows']} rows kept; dropped: {reasons}",
        file=sys.stderr,
    )
    return manifest

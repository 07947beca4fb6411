"""The teacher stage on a Prefect work pool: each shard of a build is one `build-shard` flow
run (flows/shard_runs.py) that a worker (`prefect worker start --pool POOL --type process`,
on any machine) picks up.

The parent build (flows/build.py) writes every shard's prompts under `output_dir/.building/`
first; a shard run reads its prompts from there, answers them with its own teacher client
and its own connection to the run's ledger, runs the response filters, writes the shard's
files and, last, `.building/results/shard-k.json`. The parent keeps `dataset.workers` runs
in flight, records each shard as finished when its run completes, and fails with the run's
name and message when one fails, or when no worker picks a run up within
`dataset.worker_wait_s`. Ctrl-C (or any failure) cancels the runs still in flight.

A build killed outright (SIGKILL, the OOM killer) cannot cancel its runs. The next build
of the same output_dir finds them (`orphaned_shard_runs`: runs of its deployment for that
directory, not yet ended) before submitting anything: a run with exactly this build's
parameters for a shard still to do is adopted, as if this build had submitted it (and if
it then ends badly, its shard is submitted once more: its answers are in the ledger); any
other is cancelled, and waited for, so that no shard is answered by two runs at once.

Every worker must see `output_dir` at the same path (a shared filesystem) and have the
teacher key's environment variable; only the variable's name travels in the parameters.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from distillflow.config import ConfigError, DistillConfig
from distillflow.progress import ProgressBar
from distillflow.runs import get_run_logger
from distillflow.tasks.build.shards import BUILDING, ShardPlan, ShardResult

SHARD_FLOW = "build-shard"
POLL_S = 1.0
WAITING = {"SCHEDULED", "PENDING"}
ENDED_BADLY = {"FAILED", "CRASHED", "CANCELLED", "CANCELLING"}
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ADOPTABLE = {"SCHEDULED", "PENDING", "RUNNING"}  # an orphaned shard run in these goes on for the next build


def result_path(output_dir: Path, index: int) -> Path:
    return Path(output_dir) / BUILDING / "results" / f"shard-{index:05d}.json"


def ensure_process_pool(pool: str) -> None:
    """Create the process work pool `pool` when it does not exist yet (a worker started with
    `--type process` creates it too; whichever comes first)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass


def register_shard_deployment(config: DistillConfig, shard_flow: Any) -> str:
    """The `build-shard/NAME` deployment of `shard_flow` (flows/shard_runs.py `build_shard`)
    on `dataset.work_pool` (created or updated), run by
    module path so nothing is uploaded: the workers import the installed package. Returns
    its "flow/deployment" name."""
    import httpx
    from prefect.deployments.runner import EntrypointType, deploy
    from prefect.settings import PREFECT_API_URL

    pool = config.dataset.work_pool
    if not PREFECT_API_URL.value():
        raise ConfigError(
            f"dataset.work_pool={pool!r} sends shards to a Prefect server's work pool, and no server is "
            "configured: set PREFECT_API_URL to its API (e.g. http://127.0.0.1:4200/api; `prefect server start` "
            "runs one), or remove dataset.work_pool to answer the shards in this process"
        )
    try:
        ensure_process_pool(pool)
    except httpx.ConnectError as error:
        raise ConfigError(
            f"dataset.work_pool={pool!r}: the Prefect server at PREFECT_API_URL={PREFECT_API_URL.value()} does "
            f"not answer ({error}); start it (`prefect server start`) or point PREFECT_API_URL at a running one"
        ) from None
    deployment = shard_flow.to_deployment(
        name=config.name,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": os.getcwd()},
        tags=["distillflow", "build-shard"],
    )
    deploy(deployment, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
           ignore_warnings=True)
    return f"{SHARD_FLOW}/{config.name}"


def orphaned_shard_runs(client: Any, deployment: str, output_dir: Path) -> list[Any]:
    """Runs of the `deployment` ("build-shard/NAME") for `output_dir` that have not ended:
    left in flight by an earlier build of it that was killed before it could cancel them."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deployment_id = client.read_deployment_by_name(deployment).id
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
        ))),
    )
    return [run for run in runs if str(run.parameters.get("config", {}).get("output_dir")) == str(output_dir)]


def adopt_or_cancel_orphans(
    client: Any, orphans: list[Any], shard_parameters: dict[int, dict[str, Any]], wait_s: float
) -> dict[int, Any]:
    """Adopt each orphaned run whose parameters are exactly those this build would submit for
    a shard still to do (`shard_parameters`: shard -> parameters); cancel the others and wait
    up to `wait_s` for them to end. Returns shard -> the id of the run adopted for it."""
    from prefect.states import Cancelled, Cancelling

    adopted: dict[int, Any] = {}
    cancelled = []
    for run in orphans:
        kind = run.state.type.value if run.state else "SCHEDULED"
        index = run.parameters.get("index")
        if kind in ADOPTABLE and index in shard_parameters and index not in adopted and (
            run.parameters == shard_parameters[index]
        ):
            adopted[index] = run.id
            continue
        if kind != "CANCELLING":  # a run no worker has taken is cancelled outright; a worker stops the others
            state = Cancelled if kind == "SCHEDULED" else Cancelling
            client.set_flow_run_state(run.id, state(message="left by a build that was killed; superseded"), force=True)
        cancelled.append(run)
    deadline = time.monotonic() + wait_s
    for run in cancelled:
        while (current := client.read_flow_run(run.id)).state.type.value not in ENDED:
            if time.monotonic() > deadline:
                # No worker acted on the cancellation within wait_s: the worker that ran it is gone
                # (killed with the build). Mark it ended so this build can take its shard; answers
                # it already paid for are in the ledger and are not asked again.
                get_run_logger().warning(
                    "flow run %r, left by an earlier build of this output_dir, is still %s after %g s (its "
                    "worker is gone): marked Cancelled and its shard taken over", run.name, current.state.name, wait_s,
                )
                client.set_flow_run_state(run.id, Cancelled(message="its worker is gone; shard taken over"), force=True)
                break
            time.sleep(POLL_S)
    return adopted


def answer_shards_on_pool(
    config: DistillConfig, plan: ShardPlan, progress: ProgressBar, stats: Any, shard_flow: Any
) -> None:
    """Every unfinished shard as one run of `shard_flow` on `dataset.work_pool`, `dataset.workers`
    in flight; each shard is recorded as finished the moment its run completes."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    output_dir = Path(config.output_dir).resolve()
    shard_config = config.model_copy(update={"output_dir": output_dir})
    parameters = shard_config.model_dump(mode="json")
    deployment = register_shard_deployment(config, shard_flow)
    pending = plan.unfinished()
    in_flight: dict[UUID, tuple[int, float]] = {}  # flow run id -> (shard, submitted at)
    adopted: set[UUID] = set()  # runs an earlier, killed build submitted
    pool = config.dataset.work_pool
    try:
        with get_client(sync_client=True) as client:
            shard_parameters = {
                index: {"config": parameters, "index": index, "reject_file": plan.first_reject_file + index}
                for index in pending
            }
            orphans = orphaned_shard_runs(client, deployment, output_dir)
            if orphans:
                for index, run_id in adopt_or_cancel_orphans(
                    client, orphans, shard_parameters, config.dataset.worker_wait_s
                ).items():
                    pending.remove(index)
                    in_flight[run_id] = (index, time.monotonic())
                    adopted.add(run_id)
                get_run_logger().warning(
                    "%d shard run(s) of an earlier build of %s had not ended (that build was killed): adopted %d, "
                    "cancelled %d", len(orphans), output_dir, len(adopted), len(orphans) - len(adopted),
                )
            while pending or in_flight:
                while pending and len(in_flight) < config.dataset.workers:
                    index = pending.pop(0)
                    result_path(output_dir, index).unlink(missing_ok=True)
                    run = run_deployment(
                        deployment,
                        parameters=shard_parameters[index],
                        flow_run_name=f"shard-{index}",
                        timeout=0,
                        as_subflow=True,
                    )
                    in_flight[run.id] = (index, time.monotonic())
                time.sleep(POLL_S)
                for run_id, (index, submitted) in list(in_flight.items()):
                    run = client.read_flow_run(run_id)
                    kind = run.state.type.value if run.state else "SCHEDULED"
                    if kind == "COMPLETED":
                        del in_flight[run_id]
                        result = ShardResult(**json.loads(result_path(output_dir, index).read_text(encoding="utf-8")))
                        plan.state.record(result)
                        stats.add(result.usage)
                        progress(result.prompts)
                    elif kind in ENDED_BADLY and run_id in adopted:  # e.g. killed with its build: once more
                        del in_flight[run_id]
                        adopted.discard(run_id)
                        pending.insert(0, index)
                    elif kind in ENDED_BADLY:
                        del in_flight[run_id]
                        message = run.state.message if run.state else ""
                        raise RuntimeError(
                            f"shard {index} failed on work pool {pool!r}: flow run {run.name!r} ended "
                            f"{run.state.name if run.state else kind}: {message}. Its log is in the Prefect UI "
                            "(flow run page); rerun the build to resume from the shards already written"
                        )
                    elif kind in WAITING and time.monotonic() - submitted > config.dataset.worker_wait_s:
                        raise TimeoutError(
                            f"no worker of work pool {pool!r} picked up shard {index} (flow run {run.name!r}) within "
                            f"dataset.worker_wait_s={config.dataset.worker_wait_s:g} s: start one with `prefect worker "
                            f"start --pool {pool} --type process` where distillflow is installed and output_dir "
                            f"({output_dir}) is reachable"
                        )
    except BaseException:
        with get_client(sync_client=True) as client:
            for run_id in in_flight:
                try:
                    client.set_flow_run_state(run_id, Cancelling(message="the parent build stopped"), force=True)
                except Exception:  # noqa: BLE001 - best effort: the build's own error is the one to report
                    pass
        raise

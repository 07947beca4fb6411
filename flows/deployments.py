"""Prefect deployments of every flow, for the UI: `distill serve` (this machine runs them)
and `distill deploy` (a work pool's workers run them).

Each deployment's one parameter is the part of the typed config its stage reads (`STAGE_KEYS`:
a `BuildConfig`, `CaptureForm`, ...), so the UI's "Run" page shows it as a form and the server
rejects invalid values before a run starts. Only the NAME of the teacher key's env var is in
it: the process that runs the flow (the `serve` process or the worker) needs the key in its
environment.

A run that fails with one of the project's errors (a bad config, an unreachable teacher) ends
Failed with the error's paragraph as its state message, logged once at ERROR; Prefect's own
reports of it, tracebacks included, are at DEBUG (distillflow/failures.py).

Every run first checks its form as a whole config (the rules across sections). The build
deployment's run is a `build-dataset` flow run. The other stages' flows take a config file
(training launches DeepSpeed processes that read it), so their deployments run a small flow
that writes the config to a temporary YAML file and runs the stage's command on it, preflight
included: the stage's own flow appears inside it as a subflow.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect import flow
from pydantic import Field, create_model

from distillflow.base_config import StrictModel
from distillflow.config import (
    ConfigError,
    DistillConfig,
    SeedSource,
    config_as_written,
    load_config,
    parse_config,
    read_yaml,
)
from distillflow.failures import fail_cleanly
from distillflow.flows.build import build_dataset
from distillflow.flows.shard_runs import ensure_process_pool

DEFAULT_POOL = "distillflow"


def run_stage(command: Callable[[str], Any], form: Any, flow_name: str) -> Any:
    """A stage's form (its sections of the config) checked as a whole config, so a rule across
    sections fails before any task runs, then written to a YAML file for `command` for the
    length of the run (relative paths in it still resolve against the working directory, as
    on the command line). A project error is the run's one paragraph (`fail_cleanly`)."""

    def run() -> Any:
        config = parse_config(form.model_dump(mode="json"), f"the {flow_name} deployment's config")
        with tempfile.TemporaryDirectory(prefix="distill-deployment-") as directory:
            path = Path(directory) / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', config.name)}.yaml"
            path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
            return command(str(path))

    return fail_cleanly(run)


def stage_form(name: str, keys: tuple[str, ...], doc: str, **overrides: Any) -> type[StrictModel]:
    """A deployment's form: the sections of DistillConfig a stage reads, with the same types,
    defaults and help (`overrides`: a field typed otherwise for this stage)."""
    fields = {key: (DistillConfig.model_fields[key].annotation, DistillConfig.model_fields[key]) for key in keys}
    return create_model(name, __base__=StrictModel, __doc__=doc, **(fields | overrides))  # type: ignore[call-overload, no-any-return]


# What each stage reads of a config. A stage that trains or evaluates reads the teacher (an
# in-process or served teacher scores on-policy samples, judges and is evaluated), the
# capture (a kd_topk student trains on what it wrote), the training (its dataset and
# held-out split) and the shared chat template.
MODEL_KEYS = ("name", "output_dir", "teacher", "chat_template", "chat_template_stop", "capture", "training")
BUILD_KEYS = (
    "name", "output_dir", "license", "seeds", "prompts", "teacher", "chat_template", "chat_template_stop",
    "filters", "dataset",
)
STAGE_KEYS = {
    "build": BUILD_KEYS,
    "capture": MODEL_KEYS,
    "train": (*MODEL_KEYS, "evaluation"),
    "eval": (*MODEL_KEYS, "evaluation"),
    "sweep": (*MODEL_KEYS, "evaluation", "sweep"),
    "mine": (*MODEL_KEYS, "license", "prompts", "filters", "dataset", "evaluation", "mining"),
    "run": tuple(key for key in DistillConfig.model_fields if key != "schedule"),
}
# The stages that make prompts need at least one seed file (DistillConfig lets other configs omit it).
REQUIRED_SEEDS = (list[SeedSource], Field(..., min_length=1, description=DistillConfig.model_fields["seeds"].description))
BuildConfig = stage_form(
    "BuildConfig", BUILD_KEYS,
    "What `distill build` reads of a config: the seeds, how prompts are made, the teacher, the filters and how "
    "the build is sharded.",
    seeds=REQUIRED_SEEDS,
)
CaptureForm = stage_form(
    "CaptureForm", STAGE_KEYS["capture"],
    "What `distill capture-logits` reads of a config: the dataset (output_dir), the teacher, the capture and the "
    "training it feeds.",
)
TrainForm = stage_form(
    "TrainForm", STAGE_KEYS["train"],
    "What `distill train` reads of a config: the dataset, the teacher, the capture, the training and the held-out "
    "split evaluation keeps.",
)
EvalForm = stage_form(
    "EvalForm", STAGE_KEYS["eval"],
    "What `distill eval` reads of a config: the models (teacher, trained student) and the evaluation.",
)
SweepForm = stage_form(
    "SweepForm", STAGE_KEYS["sweep"],
    "What `distill sweep` reads of a config: the training and evaluation each point varies, and the grid.",
)
MineForm = stage_form(
    "MineForm", STAGE_KEYS["mine"],
    "What `distill mine` reads of a config: the dataset, the candidates' prompts and filters, the teacher, the "
    "student's training and evaluation, and the mining.",
)
RunForm = stage_form(
    "RunForm", STAGE_KEYS["run"],
    "Every stage of the config, as `distill run` runs them.",
    seeds=REQUIRED_SEEDS,
)

STAGE_FORMS = {"build": BuildConfig, "capture": CaptureForm, "train": TrainForm, "eval": EvalForm,
               "sweep": SweepForm, "mine": MineForm, "run": RunForm}


@flow(name="distill-capture-logits")
def capture_deployment(config: CaptureForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill capture-logits`: add the teacher's top-k logprobs to the config's dataset."""
    from distillflow.flows.capture_logits import capture_logits_command

    return run_stage(capture_logits_command, config, "distill-capture-logits")


@flow(name="distill-train")
def train_deployment(config: TrainForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill train`: train the student of the config's `training:` section."""
    from distillflow.flows.train import train_command

    return run_stage(train_command, config, "distill-train")


@flow(name="distill-eval")
def eval_deployment(config: EvalForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill eval`: evaluate the models of the config's `evaluation:` section."""
    from distillflow.flows.evaluate import eval_command

    return run_stage(eval_command, config, "distill-eval")


@flow(name="distill-sweep")
def sweep_deployment(config: SweepForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill sweep`: train and evaluate every point of the config's `sweep:` grid."""
    from distillflow.flows.sweep import sweep_command

    return run_stage(sweep_command, config, "distill-sweep")


@flow(name="distill-mine")
def mine_deployment(config: MineForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill mine`: add the prompts the student gets most wrong; retrain and evaluate."""
    from distillflow.flows.mine import mine_command

    return run_stage(mine_command, config, "distill-mine")


@flow(name="distill-run")
def run_deployment(config: RunForm) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill run`: every stage the config asks for, as one parent flow."""
    from distillflow.flows.pipeline import run_command

    return run_stage(run_command, config, "distill-run")


def stage_form_values(stage: str, config: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """A deployment's parameter: the keys of `config` (a dumped config) that its stage reads.
    An in-process teacher's base_url is left empty unless the file (`written`) sets it: no stage
    reads it (a vLLM capture falls back to it, so then it stays)."""
    form = {key: value for key, value in config.items() if key in STAGE_KEYS[stage]}
    teacher = dict(form["teacher"])
    capture = form.get("capture") or {}
    reads_url = capture.get("source") == "vllm" and not capture.get("base_url")
    if teacher.get("backend") == "local" and "base_url" not in (written.get("teacher") or {}) and not reads_url:
        teacher["base_url"] = None
    return form | {"teacher": teacher}


@flow(name="build-dataset")
def build_deployment(config: BuildConfig) -> dict[str, Any]:  # type: ignore[valid-type]
    """`distill build`: answer the prompts of the config with its teacher and write the dataset."""
    return fail_cleanly(run_build, config.model_dump(mode="json"))  # type: ignore[attr-defined]


def run_build(data: dict[str, Any]) -> dict[str, Any]:
    """The build of a BuildConfig's data, checked as a whole config first (rules across sections)."""
    return build_dataset.fn(parse_config(data, "the build deployment's config"))  # type: ignore[no-any-return]


# Deployment name (the keys of the config's `schedule:` section) → the flow it runs.
DEPLOYMENT_FLOWS = {
    "build": build_deployment,
    "capture": capture_deployment,
    "train": train_deployment,
    "eval": eval_deployment,
    "sweep": sweep_deployment,
    "mine": mine_deployment,
    "run": run_deployment,
}


def runner_deployments(config_paths: list[Path], **options: Any) -> list[Any]:
    """One RunnerDeployment per stage of each config (`DistillConfig.deployment_names`), named
    after the config, with the config's schedules; `options` go to `Flow.to_deployment`."""
    if not config_paths:
        raise ConfigError("give at least one config")
    deployments = []
    names: dict[str, Path] = {}
    for path in config_paths:
        config = load_config(path)
        if config.name in names:
            raise ConfigError(
                f"{path}: name {config.name!r} is also the name of {names[config.name]}; deployments are "
                "named after their config, so give each config its own `name:`"
            )
        names[config.name] = Path(path)
        entries = config.schedule.entries() if config.schedule is not None else {}
        written = config_as_written(path)
        for stage in config.deployment_names():
            entry = entries.get(stage)
            form = stage_form_values(stage, written, read_yaml(Path(path)))
            deployments.append(
                DEPLOYMENT_FLOWS[stage].to_deployment(
                    name=config.name,
                    parameters={"config": form},
                    schedules=[entry.to_prefect()] if entry is not None else None,
                    tags=["distillflow", stage],
                    **options,
                )
            )
    return deployments


def server_unreachable(command: str, error: Exception) -> ConfigError:
    """The paragraph for a configured Prefect server that refuses connections."""
    from prefect.settings import PREFECT_API_URL

    return ConfigError(
        f"{command}: the Prefect server at PREFECT_API_URL={PREFECT_API_URL.value()} does not answer "
        f"({error}); start it (`prefect server start`) or point PREFECT_API_URL at a running one"
    )


def _mode(pool: str | None) -> str:
    return f"on work pool {pool!r} (`distill deploy`)" if pool else "served by `distill serve` (no work pool)"


def refuse_takeover(deployments: list[Any], pool: str | None, replace: bool = False) -> None:
    """Refuse to register a deployment under a name that another mode already holds (served
    vs a work pool, or another pool): registering it would silently move its runs (and
    schedules) away from the process that runs them today. `replace=True` takes it over."""
    if replace:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    clashes = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            except httpx.ConnectError as error:  # the first call to the server
                raise server_unreachable("distill deploy" if pool else "distill serve", error) from None
            if (existing.work_pool_name or None) != (pool or None):
                clashes.append(f"{name} is {_mode(existing.work_pool_name)}")
    if clashes:
        raise ConfigError(
            f"{'; '.join(clashes)}: registering it {_mode(pool)} would take its runs and schedules away "
            "from what runs them now. Give the config another `name:`, or pass --replace to take it over"
        )


def serve_command(config_paths: list[Path], replace: bool = False) -> None:
    """Register every deployment of the configs and run their flow runs in this process's
    machine until interrupted (Ctrl-C pauses their schedules). Refuses names that `distill
    deploy` put on a work pool unless `replace`."""
    from prefect import serve

    deployments = runner_deployments(config_paths)
    refuse_takeover(deployments, None, replace)
    serve(*deployments)


def deploy_command(
    config_paths: list[Path], pool: str = DEFAULT_POOL, working_dir: Path | None = None, replace: bool = False
) -> list[str]:
    """Register every deployment of the configs on the work pool `pool`; a worker
    (`prefect worker start --pool POOL --type process`) with distillflow installed runs them.

    The flows are referenced by module (`flows.deployments.build_deployment`, ...), so nothing is
    uploaded: the worker imports the installed package. Runs start in `working_dir` (default:
    the current directory), where the configs' relative paths resolve as on the command line.
    A name that `distill serve` or another pool holds is refused unless `replace`.
    Returns the deployments' "flow/deployment" names."""
    from prefect.deployments.runner import EntrypointType, deploy
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "distill deploy registers deployments on a running Prefect server, and none is configured: "
            "set PREFECT_API_URL to its API (e.g. http://127.0.0.1:4200/api; `prefect server start` runs one)"
        )
    working_dir = (working_dir or Path.cwd()).resolve()
    deployments = runner_deployments(
        config_paths,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": str(working_dir)},
    )
    try:
        refuse_takeover(deployments, pool, replace)
        ensure_process_pool(pool)
    except httpx.ConnectError as error:  # the first call to the server
        raise server_unreachable("distill deploy", error) from None
    deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False, ignore_warnings=True)
    names = [f"{deployment.flow_name}/{deployment.name}" for deployment in deployments]
    for name in names:
        print(f"deployed {name} → work pool {pool!r}")
    return names

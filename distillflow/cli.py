"""The `distill` command line. Each command parses its arguments and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

# Before Prefect is imported: no telemetry (it fails offline and locks SQLite), and time
# for the temporary local server to start on a small machine when no PREFECT_API_URL is set.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import typer  # noqa: E402

app = typer.Typer(
    help="distillflow: build teacher datasets, filter them, and distill a student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _every_command(ctx: typer.Context) -> None:
    # SIGINT/SIGTERM stop any command within seconds, with exit code 130/143 (distillflow/interrupt.py).
    from distillflow.interrupt import exit_on_signals

    ctx.with_resource(exit_on_signals())


def _fail(error: BaseException) -> None:
    """Print a one-paragraph error and exit non-zero."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def build(
    config: Path = typer.Argument(..., help="YAML config (see configs/)."),
    prompt_column: Optional[str] = typer.Option(None, help="Override the prompt column of every seed file."),
) -> None:
    """Black-box dataset flow: prompts → teacher → filters → Parquet."""
    from distillflow.config import ConfigError
    from flows.build import build_command
    from tasks.teacher import TeacherFatalError

    try:
        build_command(config, prompt_column=prompt_column)
    except (ConfigError, TeacherFatalError) as error:
        _fail(error)


@app.command()
def dedup(
    in_dir: Path = typer.Argument(..., help="An existing dataset directory (with data/)."),
    out_dir: Path = typer.Argument(..., help="Where the filtered dataset is written."),
    config: Optional[Path] = typer.Option(
        None, help="YAML config whose `filters:` section is used (default: the filters in IN_DIR's manifest)."
    ),
    engine: str = typer.Option(
        "prefect", help="prefect (flow, local threads), dask (flow on a Dask cluster) or local (no Prefect)."
    ),
    dask_address: Optional[str] = typer.Option(None, help="Scheduler of an existing Dask cluster (engine dask)."),
    workers: int = typer.Option(2, help="Worker processes of the local Dask cluster (engine dask, no address)."),
) -> None:
    """Run the filtering stage alone on an existing dataset."""
    from distillflow.config import ConfigError
    from flows.dedup import dedup_command

    if engine not in ("prefect", "dask", "local"):
        _fail(ValueError(f"--engine must be prefect, dask or local (got {engine!r})"))
    try:
        dedup_command(in_dir, out_dir, config, engine=engine, dask_address=dask_address, workers=workers)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(error)


@app.command("capture-logits")
def capture_logits(config: Path = typer.Argument(..., help="YAML config.")) -> None:
    """Add teacher top-k logprobs to a dataset (white-box data)."""
    from distillflow.config import ConfigError
    from flows.capture_logits import capture_logits_command

    try:
        capture_logits_command(config)
    except (ConfigError, FileNotFoundError) as error:
        _fail(error)


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config with a `training:` section.")) -> None:
    """Train a student from a dataset with DeepSpeed ZeRO."""
    from flows.train import train_command

    train_command(config)


@app.command("eval")
def eval_(config: Path = typer.Argument(..., help="YAML config with an `evaluation:` section.")) -> None:
    """Evaluate students and the teacher: accuracy, robustness, held-out agreement, speed, size."""
    from distillflow.config import ConfigError
    from flows.evaluate import eval_command
    from tasks.teacher import TeacherFatalError

    try:
        eval_command(config)
    except (ConfigError, TeacherFatalError, FileNotFoundError) as error:
        _fail(error)


@app.command()
def sweep(config: Path = typer.Argument(..., help="YAML config with `training:`, `evaluation:` and `sweep:` sections.")) -> None:
    """Train and evaluate every point of a grid of training settings; ranked table and chart."""
    from distillflow.config import ConfigError
    from flows.sweep import SweepFailed, sweep_command

    try:
        sweep_command(config)
    except (ConfigError, SweepFailed, FileNotFoundError) as error:
        _fail(error)


@app.command()
def mine(config: Path = typer.Argument(..., help="YAML config with a `mining:` section.")) -> None:
    """Add the prompts the student gets most wrong (answered by the teacher); retrain and evaluate."""
    from distillflow.config import ConfigError
    from flows.mine import mine_command
    from tasks.teacher import TeacherFatalError

    try:
        mine_command(config)
    except (ConfigError, TeacherFatalError, FileNotFoundError) as error:
        _fail(error)


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="A dataset directory written by `distill build`."),
    samples: int = typer.Option(3, help="Sample rows to show from data/ and rejects/."),
    seed: int = typer.Option(0, help="Seed of the sample."),
) -> None:
    """Summary, counts per strategy / reject reason, length histograms, samples."""
    from storage.inspect import inspect_dataset

    try:
        typer.echo(inspect_dataset(directory, samples=samples, seed=seed))
    except FileNotFoundError as error:
        _fail(error)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo dataset and student go."),
    train: bool = typer.Option(True, "--train/--no-train", help="Also train a student."),
) -> None:
    """The whole pipeline on the embedded default (tiny local teacher), on CPU."""
    from distillflow.config import ConfigError
    from flows.demo import demo_command

    try:
        demo_command(workdir, train_student=train)
    except ConfigError as error:
        _fail(error)


@app.command()
def run(config: Path = typer.Argument(..., help="YAML config (dataset, and training if present).")) -> None:
    """All stages the config asks for (build → capture-logits → train) as one parent flow."""
    from distillflow.config import ConfigError
    from flows.pipeline import run_command
    from tasks.teacher import TeacherFatalError

    try:
        run_command(config)
    except (ConfigError, TeacherFatalError) as error:
        _fail(error)


@app.command()
def serve(
    configs: list[Path] = typer.Argument(..., help="One or more YAML configs to deploy."),
    cron: Optional[str] = typer.Option(None, help="Cron schedule, e.g. '0 3 * * *'."),
    interval_s: Optional[float] = typer.Option(None, help="Run every N seconds."),
) -> None:
    """Register Prefect deployments (build-dataset, distill-pipeline) and serve them."""
    from distillflow.config import ConfigError
    from flows.pipeline import serve_command

    try:
        serve_command(configs, cron=cron, interval_s=interval_s)
    except ConfigError as error:
        _fail(error)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

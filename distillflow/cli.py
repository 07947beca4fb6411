"""The `distill` command line. Each command parses its arguments and calls one function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="distillflow: build teacher datasets, filter them, and distill a student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    config: Optional[Path] = typer.Option(None, help="YAML config whose `filters:` section is used."),
) -> None:
    """Run the filtering stage alone on an existing dataset."""
    from flows.dedup import dedup_command

    dedup_command(in_dir, out_dir, config)


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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

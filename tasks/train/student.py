"""Training hand-off: launch student training as a subprocess and report it to Prefect.

`train_student` builds the command with `training.launch.build_launch_command` (torchrun or
python running `python -m distillflow.training.train --config CONFIG`), streams every output line into
the run's logger as it comes, raises on a non-zero exit with the last lines in the
message, then publishes the loss curve (table) and the final metrics (markdown) as
artifacts from `OUTPUT_DIR/metrics.jsonl` and `OUTPUT_DIR/metrics.json`.

Training runs in its own process (and process group) so that DeepSpeed, torch.distributed
and their threads never share the orchestrator's interpreter; the plain functions below
need no Prefect and are what the tests call.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from distillflow.config import load_training_config
from distillflow.interrupt import cancel_on_interrupt
from distillflow.progress import progress
from distillflow.runs import get_run_logger, keeps_artifacts
from distillflow.training.config import TrainingConfig

TAIL_LINES = 30  # output lines quoted in the error of a failed run
MAX_CURVE_ROWS = 500  # rows of the loss-curve artifact (evenly thinned, last step kept)
# Columns of the loss-curve table, in this order, when metrics.jsonl has them.
CURVE_COLUMNS = ("step", "loss", "kd", "ce", "hidden", "lr", "tokens", "elapsed_s")


class TrainingFailed(RuntimeError):
    """The training process exited non-zero (or timed out); the message quotes its output."""


# -- config ---------------------------------------------------------------------------------


# -- subprocess -----------------------------------------------------------------------------

STEP_LINE = re.compile(r"\[train\] step (\d+)/(\d+)\b(?:.*?\bloss ([-+0-9.eEnaif]+))?")
STEP_LINES_LOGGED = 20  # step lines passed on to the run's log, at most (about) this many


def training_line_handler(log: Callable[[str], None], bar: Callable[..., Any]) -> Callable[[str], None]:
    """Route the training subprocess's output: `[train] step S/N ...` lines move the progress
    bar and about `STEP_LINES_LOGGED` of them (evenly spaced, and the last) reach `log`, so a
    long run does not flood the run's log; every other line goes to `log` as printed."""

    def on_line(line: str) -> None:
        match = STEP_LINE.search(line)
        if match is None:
            log(line)
            return
        step, total = int(match.group(1)), int(match.group(2))
        bar.update(completed=step, total=total, detail=f"loss {match.group(3)}" if match.group(3) else None)
        if step == total or step % max(1, total // STEP_LINES_LOGGED) == 0:
            log(line)

    return on_line


def run_streaming(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    tail_lines: int = TAIL_LINES,
) -> None:
    """Run `argv`, calling `on_line` with each line of its stdout+stderr as it is printed.

    Raises TrainingFailed on a non-zero exit or after `timeout_s` (the whole process
    group is killed), quoting the last `tail_lines` lines.
    """
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        env=child_env,
        cwd=cwd,
        start_new_session=True,  # its own process group: torchrun's workers die with it
    )
    tail: deque[str] = deque(maxlen=tail_lines)
    timed_out = threading.Event()
    timer = None
    if timeout_s is not None:

        def kill_on_timeout() -> None:
            timed_out.set()
            _kill_group(process)

        timer = threading.Timer(timeout_s, kill_on_timeout)
        timer.start()
    try:
        # Ctrl-C / SIGTERM kill the trainer at once, from the signal's helper thread: the
        # KeyboardInterrupt it also raises can land where Python ignores it (a __del__).
        with cancel_on_interrupt(lambda: _kill_group(process)):
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                on_line(line)
            returncode = process.wait()
    except BaseException:
        _kill_group(process)  # cancelled or interrupted: never leave training running
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out.is_set():
        raise TrainingFailed(_failure_message(argv, f"timed out after {timeout_s:g} s", tail))
    if returncode != 0:
        raise TrainingFailed(_failure_message(argv, f"exited with code {returncode}", tail))


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _failure_message(argv: Sequence[str], what: str, tail: deque[str]) -> str:
    lines = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
    return f"training {what}: {' '.join(argv)}\nlast {len(tail)} line(s) of its output:\n{lines}"


# -- metrics --------------------------------------------------------------------------------


def read_metrics(output_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-step records of metrics.jsonl, final metrics.json); missing files give empty ones."""
    output_dir = Path(output_dir)
    steps: list[dict[str, Any]] = []
    steps_path = output_dir / "metrics.jsonl"
    if steps_path.is_file():
        for line in steps_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                steps.append(json.loads(line))
    final_path = output_dir / "metrics.json"
    final = json.loads(final_path.read_text(encoding="utf-8")) if final_path.is_file() else {}
    return steps, final


def loss_curve_rows(steps: list[dict[str, Any]], max_rows: int = MAX_CURVE_ROWS) -> list[dict[str, Any]]:
    """The loss curve as table rows, evenly thinned to at most `max_rows` (last step kept)."""
    if len(steps) > max_rows:
        stride = math.ceil(len(steps) / max_rows)
        steps = steps[::stride] if (len(steps) - 1) % stride == 0 else steps[::stride] + [steps[-1]]
    columns = [column for column in CURVE_COLUMNS if any(column in step for step in steps)]
    return [{column: _rounded(step.get(column)) for column in columns} for step in steps]


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def summary_markdown(title: str, steps: list[dict[str, Any]], final: dict[str, Any]) -> str:
    """Markdown of the final metrics, with the first/last loss and throughput of the curve."""
    lines = [f"# {title}", ""]
    if steps:
        first, last = steps[0], steps[-1]
        lines.append(
            f"{len(steps)} logged step(s); loss {first.get('loss'):.4f} at step {first.get('step')} "
            f"→ {last.get('loss'):.4f} at step {last.get('step')}."
        )
        tokens = sum(step.get("tokens") or 0 for step in steps)  # `tokens` is per step
        if tokens and last.get("elapsed_s"):
            lines.append(f"{tokens:,} tokens in {last['elapsed_s']:.1f} s ({tokens / last['elapsed_s']:,.0f} tokens/s).")
        lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    for key, value in final.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else _rounded(value)
        lines.append(f"| {key} | {shown} |")
    if not final:
        lines.append("| (no metrics.json written) | |")
    return "\n".join(lines) + "\n"


def artifact_key(output_dir: str | Path, suffix: str) -> str:
    """`<run name>-<suffix>`: lowercase letters, digits and dashes, as Prefect requires."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(output_dir).resolve().name.lower()).strip("-") or "train"
    return f"{slug}-{suffix}"


# -- Prefect task ---------------------------------------------------------------------------


def build_command(config_path: str | Path, config: TrainingConfig, num_processes: int | None) -> list[str]:
    from distillflow.training.launch import build_launch_command

    return build_launch_command(
        config_path, num_processes or config.num_processes, master_port=config.master_port
    )


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(
    config_path: str,
    num_processes: int | None = None,
    command: list[str] | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the student in a subprocess; returns the final metrics (metrics.json).

    `command` replaces the launch command built from the config (another launcher or
    wrapper); `num_processes` overrides training.num_processes.
    """
    logger = get_run_logger()
    config = load_training_config(config_path)
    argv = command or build_command(config_path, config, num_processes)
    logger.info("launching training: %s", " ".join(argv))
    from distillflow.training.launch import launch_env

    with progress(
        f"train {Path(config.output_dir).name}", total=config.max_steps, unit="steps",
        artifact_key=artifact_key(config.output_dir, "train-progress"),
    ) as bar:
        run_streaming(argv, training_line_handler(logger.info, bar), env=launch_env() | (env or {}), timeout_s=timeout_s)

    steps, final = read_metrics(config.output_dir)
    if not keeps_artifacts():  # no server shows them; metrics.json holds the same (matplotlib: ~0.5 s)
        return final
    create_table_artifact(
        table=loss_curve_rows(steps),
        key=artifact_key(config.output_dir, "loss-curve"),
        description=f"Training loss per optimizer step ({config.objective}), {config.output_dir}",
    )
    from distillflow.tasks.artifact_charts import loss_curve_markdown

    create_markdown_artifact(
        markdown=loss_curve_markdown(f"Loss curve ({config.objective}): {config.output_dir}", steps),
        key=artifact_key(config.output_dir, "loss-chart"),
        description="Training loss per optimizer step, as a chart",
    )
    create_markdown_artifact(
        markdown=summary_markdown(f"Student training: {config.output_dir}", steps, final),
        key=artifact_key(config.output_dir, "final-metrics"),
        description="Final metrics of the student training run",
    )
    return final

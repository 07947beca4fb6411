"""The `distill` command line. Each command parses its arguments and calls one function."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

# Before Prefect is imported: no telemetry (it fails offline and locks SQLite), and time
# for the temporary local server to start on a small machine when no PREFECT_API_URL is set.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import click  # noqa: E402
import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

if TYPE_CHECKING:
    from distillflow.storage.manifest import Manifest


class _OneErrorParagraph(TyperGroup):
    """Runs every command inside `distillflow.failures.command_log`: whatever fails, in the
    command or inside a Prefect flow or task, ends as one `error: ...` paragraph on stderr
    and exit code 1, with the traceback in a log file (or on stderr with --verbose)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `distill build CONFIG --verbose` means `distill --verbose build CONFIG`.
        if "--verbose" in args[1:] and "--" not in args:
            args = ["--verbose", *(arg for arg in args if arg != "--verbose")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        from distillflow.failures import command_log
        from distillflow.interrupt import received_signal
        from distillflow.server_auth import explain_server_error

        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # the command and its arguments
        if not rest or any(arg in ("--help", "-h") for arg in rest):
            return super().invoke(ctx)
        if rest[0] != "server":
            _choose_prefect_server(rest[0])
        with command_log(rest[0], verbose=bool(ctx.params.get("verbose"))) as log:
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except SystemExit as error:
                if error.code is None or isinstance(error.code, int) or received_signal() is not None:
                    raise
                raise typer.Exit(log.fail(error)) from None
            except Exception as error:
                if received_signal() is not None:  # Ctrl-C / SIGTERM: distillflow/interrupt.py exits 130/143
                    raise
                # A Prefect server's 401 becomes the paragraph naming PREFECT_API_AUTH_STRING.
                raise typer.Exit(log.fail(explain_server_error(error))) from None


# The commands that run flows: without a server they run them without orchestration.
FLOW_COMMANDS = ("build", "dedup", "capture-logits", "train", "eval", "sweep", "mine", "demo", "run")


def _choose_prefect_server(command: str) -> None:
    """The configured server if there is one (PREFECT_API_URL, profile); else the one
    `distill server start` left running, if it answers (distillflow/local_server.py); else
    none: the command's flows run without orchestration (distillflow/runs.py), or on
    Prefect's temporary server with DISTILL_ORCHESTRATION=prefect."""
    from distillflow import runs
    from distillflow.local_server import api_url_configured, use_running_server

    if "prefect" in sys.modules:
        # Prefect already read its settings (the app runs inside another program, e.g. the
        # tests): Prefect's own choice stands.
        return
    url = use_running_server()
    if url is not None:
        typer.echo(f"distill: runs go to the Prefect server at {url} (distill server start)", err=True)
    elif command in FLOW_COMMANDS and not api_url_configured() and runs.wanted_without_server():
        runs.activate()


app = typer.Typer(
    cls=_OneErrorParagraph,
    help="distillflow: build teacher datasets, filter them, and distill a student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _every_command(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="On failure, print the full traceback (and Prefect's failure logs)."
    ),
) -> None:
    """On failure every command prints one `error: ...` paragraph and exits 1; the traceback
    goes to a log file whose path is printed ($DISTILL_LOG_DIR, default
    ~/.local/state/distillflow/logs), or to stderr with --verbose."""
    # SIGINT/SIGTERM stop any command within seconds, with exit code 130/143 (distillflow/interrupt.py).
    from distillflow.interrupt import exit_on_signals

    ctx.with_resource(exit_on_signals())


@app.command()
def build(
    config: Path = typer.Argument(..., help="YAML config (see configs/)."),
    prompt_column: Optional[str] = typer.Option(None, help="Override the prompt column of every seed file."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print prompt count, tokens and cost; send no request, write nothing."
    ),
) -> None:
    """Black-box dataset flow: prompts → teacher → filters → Parquet."""
    from distillflow.flows.build import build_command

    build_command(config, prompt_column=prompt_column, dry_run=dry_run)


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
    from distillflow.flows.dedup import dedup_command

    if engine not in ("prefect", "dask", "local"):
        raise typer.BadParameter(f"must be prefect, dask or local (got {engine!r})", param_hint="--engine")
    dedup_command(in_dir, out_dir, config, engine=engine, dask_address=dask_address, workers=workers)


@app.command("capture-logits")
def capture_logits(config: Path = typer.Argument(..., help="YAML config.")) -> None:
    """Add teacher top-k logprobs to a dataset (white-box data)."""
    from distillflow.flows.capture_logits import capture_logits_command

    capture_logits_command(config)


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config with a `training:` section.")) -> None:
    """Train a student from a dataset with DeepSpeed ZeRO."""
    from distillflow.flows.train import train_command

    train_command(config)


@app.command("eval")
def eval_(config: Path = typer.Argument(..., help="YAML config with an `evaluation:` section.")) -> None:
    """Evaluate students and the teacher: accuracy, robustness, held-out agreement, speed, size."""
    from distillflow.flows.evaluate import eval_command

    eval_command(config)


@app.command()
def sweep(config: Path = typer.Argument(..., help="YAML config with `training:`, `evaluation:` and `sweep:` sections.")) -> None:
    """Train and evaluate every point of a grid of training settings; ranked table and chart."""
    from distillflow.flows.sweep import sweep_command

    sweep_command(config)


@app.command()
def mine(config: Path = typer.Argument(..., help="YAML config with a `mining:` section.")) -> None:
    """Add the prompts the student gets most wrong (answered by the teacher); retrain and evaluate."""
    from distillflow.flows.mine import mine_command

    mine_command(config)


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="A dataset directory written by `distill build`."),
    samples: int = typer.Option(3, help="Sample rows to show from data/ and rejects/ (per strategy with --html)."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    html: Optional[Path] = typer.Option(
        None, "--html", help="Write the view, with charts, duplicate clusters and samples, as one self-contained HTML page."
    ),
    viewer: Optional[Path] = typer.Option(
        None, "--viewer", help="Write the interactive dataset viewer (table, row view, teacher token probabilities, "
        "map of the prompts) as one self-contained HTML file that works offline."
    ),
    viewer_rows: int = typer.Option(
        20_000, "--viewer-rows", min=1, help="Most rows --viewer embeds (a fixed-seed sample beyond; the page says so)."
    ),
    sql: Optional[str] = typer.Option(
        None, "--sql", help="Run a read-only DuckDB query over the tables data, rejects (and candidates) instead."
    ),
    output_format: str = typer.Option("table", "--format", help="Result format of --sql: table, csv or json (lines)."),
) -> None:
    """Summary, counts per strategy / reject reason, diversity, duplicates next to what they
    duplicate, length histograms, samples; or an HTML report (--html), an interactive viewer
    (--viewer), or SQL over the dataset's Parquet (--sql)."""
    from distillflow.storage.manifest import MANIFEST_NAME, load_manifest
    from distillflow.storage.report import scrub_secrets

    if output_format not in ("table", "csv", "json"):
        raise typer.BadParameter(f"must be table, csv or json (got {output_format!r})", param_hint="--format")
    typed = load_manifest(directory) if (directory / MANIFEST_NAME).is_file() else None
    manifest = typed.to_dict() if typed else None  # what scrub_secrets looks for secrets in
    if sql is not None:
        from distillflow.storage.query import format_result, run_query

        typer.echo(scrub_secrets(format_result(run_query(directory, sql), output_format), manifest))
        return
    if html is not None or viewer is not None:
        if html is not None:
            from distillflow.storage.report import write_report

            path = write_report(directory, html, samples=samples, seed=seed)
            typer.echo(f"report: {path}")
        if viewer is not None:
            from distillflow.storage.viewer import write_viewer

            tokenizer, tokenizer_error = _capture_tokenizer(typed)
            written = write_viewer(directory, viewer, max_rows=viewer_rows, seed=seed, tokenizer=tokenizer,
                                   tokenizer_error=tokenizer_error)
            typer.echo(written.summary())
        return
    from distillflow.storage.inspect import inspect_dataset

    typer.echo(scrub_secrets(inspect_dataset(directory, samples=samples, seed=seed), manifest))


def _capture_tokenizer(manifest: Manifest | None):
    """(AnswerTokenizer, None) for a dataset with captured top-k whose tokenizer loads, so the
    viewer can show the answer's tokens; (None, why) when it does not load; (None, None)
    when nothing was captured."""
    capture = (manifest.capture if manifest else None) or {}
    if not capture.get("tokenizer"):
        return None, None
    from distillflow.storage.viewer import AnswerTokenizer
    from distillflow.training.data import IGNORE_INDEX, encode_example
    from distillflow.training.vocabulary import load_tokenizer

    try:
        tokenizer = load_tokenizer(capture["tokenizer"])
    except (OSError, ValueError) as error:
        return None, f"{capture['tokenizer']}: {str(error).splitlines()[0]}"

    def supervised_ids(prompt: str, response: str) -> list[int]:
        example = encode_example(tokenizer, prompt, response, system_prompt=capture.get("system_prompt"),
                                 max_length=capture.get("max_length", 2048), chat_template=capture.get("chat_template"))
        # The tokens the stored positions predict (tasks.capture.logits.supervised_targets).
        labels = example["labels"]
        return [int(example["input_ids"][i]) for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX]

    texts: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = tokenizer.decode([token_id])
        return texts[token_id]

    return AnswerTokenizer(capture["tokenizer"], supervised_ids, token_text), None


@app.command("config")
def config_(
    config: Optional[Path] = typer.Argument(None, help="A YAML config to check (every key, before any teacher call)."),
    docs: bool = typer.Option(False, "--docs", help="Print the configuration reference (Markdown)."),
    write: bool = typer.Option(False, "--write", help="With --docs: rewrite docs/configuration.md instead."),
) -> None:
    """Check a config, or print the reference of every config key (generated from the models)."""
    from distillflow.config import ConfigError, load_config

    if docs:
        from distillflow.config_reference import REFERENCE_PATH, render_reference

        if write:
            REFERENCE_PATH.write_text(render_reference(), encoding="utf-8")
            typer.echo(f"wrote {REFERENCE_PATH}")
        else:
            typer.echo(render_reference(), nl=False)
        return
    if config is None:
        raise ConfigError("distill config: give a YAML config to check, or --docs for the reference")
    loaded = load_config(config)
    sections = [name for name in ("training", "evaluation", "capture", "sweep", "mining") if getattr(loaded, name)]
    typer.echo(f"{config}: valid ({', '.join(['dataset', *sections])})")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo dataset and student go."),
    train: bool = typer.Option(True, "--train/--no-train", help="Also train a student."),
) -> None:
    """The whole pipeline on the embedded default (tiny local teacher), on CPU."""
    from distillflow.flows.demo import demo_command

    demo_command(workdir, train_student=train)


@app.command()
def run(config: Path = typer.Argument(..., help="YAML config (dataset, and training if present).")) -> None:
    """All stages the config asks for (build → capture-logits → train) as one parent flow."""
    from distillflow.flows.pipeline import run_command

    run_command(config)


@app.command()
def serve(
    configs: list[Path] = typer.Argument(..., help="One or more YAML configs to deploy."),
    replace: bool = typer.Option(False, "--replace", help="Take over deployments of these names that `distill deploy` put on a work pool."),
) -> None:
    """Register a Prefect deployment of every flow of each config (with the config's `schedule:`)
    and run their flow runs on this machine until interrupted (docs/operations.md)."""
    from distillflow.flows.deployments import serve_command

    serve_command(configs, replace=replace)


@app.command()
def deploy(
    configs: list[Path] = typer.Argument(..., help="One or more YAML configs to deploy."),
    pool: str = typer.Option("distillflow", help="The process work pool whose workers run the flows (created if missing)."),
    working_dir: Optional[Path] = typer.Option(
        None, help="Where the worker runs the flows, i.e. where the configs' relative paths resolve (default: here)."
    ),
    replace: bool = typer.Option(False, "--replace", help="Take over deployments of these names that `distill serve` or another pool holds."),
) -> None:
    """Register a deployment of every flow of each config on a work pool, for
    `prefect worker start --pool POOL --type process` on any machine (docs/operations.md)."""
    from distillflow.flows.deployments import deploy_command

    deploy_command(configs, pool=pool, working_dir=working_dir, replace=replace)


server_app = typer.Typer(
    help="A local Prefect server (with its UI) that every later distill command uses (docs/operations.md).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    port: Optional[int] = typer.Option(None, help="Port on 127.0.0.1 (default 4200, or a free one if taken)."),
) -> None:
    """Start `prefect server start` in the background and record it in $PREFECT_HOME; commands
    without PREFECT_API_URL then send their runs there instead of starting a temporary server."""
    from distillflow.local_server import start_server

    state, started = start_server(port)
    ui = state.url.removesuffix("/api")
    typer.echo(f"{'started' if started else 'already running'}: {state.url} (UI {ui}, pid {state.pid}, log {state.log})")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the server `distill server start` started, with every process it spawned."""
    from distillflow.local_server import stop_server

    state = stop_server()
    typer.echo("no server recorded" if state is None else f"stopped: {state.url} (pid {state.pid})")


@server_app.command("status")
def server_status() -> None:
    """Say which server the next command will use."""
    from distillflow.local_server import api_url_configured, read_state, running_server

    if api_url_configured():
        typer.echo("PREFECT_API_URL is configured: commands use that server")
        return
    state = running_server()
    if state is not None:
        typer.echo(f"running: {state.url} (pid {state.pid}); commands use it")
    elif read_state() is not None:
        typer.echo("recorded server does not answer; commands start a temporary server (`distill server start`)")
    else:
        typer.echo("no server: each command starts a temporary one (`distill server start` for a lasting one)")


def main() -> None:  # pragma: no cover - console entry point (`distill`)
    """Run the command, then leave without tearing the interpreter down: freeing every
    module and object of a run takes 0.5-1 s on two cores, for nothing. Non-daemon threads
    are joined and the exit handlers run (Prefect's included) as at a normal exit; the
    streams are flushed; then the process ends with the command's exit code."""
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exit_:
        code = exit_.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    fast_exit(code or 0)


def fast_exit(code: int) -> None:
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()  # what the interpreter does first at exit: join the non-daemon threads
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()

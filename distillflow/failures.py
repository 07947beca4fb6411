"""One paragraph per failed `distill` command; the traceback goes to a log file.

`command_log` wraps one command:

- a log file (`$DISTILL_LOG_DIR`, default `~/.local/state/distillflow/logs/`) receives
  every log record of the run at INFO and above, Prefect's flow and task logs included
  (they also reach the Prefect UI, as always);
- on the terminal, Prefect's failure reports — the ERROR records of the `prefect.flow_runs`
  and `prefect.task_runs` loggers, which carry the same traceback once per task and once per
  flow, and their "Finished in state Failed" lines — are left out, unless `verbose`.

On a failure, `CommandLog.fail` appends the traceback to the file (and prints it with
`verbose`), then prints `error: <message>` and the file's path as the last paragraph on
stderr: the terminal takes no log record after it, up to the process's exit (Prefect logs
the stop of its temporary server then). Otherwise (success, Ctrl-C) the file is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def log_dir() -> Path:
    configured = os.environ.get("DISTILL_LOG_DIR")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "distillflow" / "logs"


class _QuietConsole(logging.Filter):
    """On the terminal: no Prefect failure reports (unless verbose); nothing at all once the
    error paragraph is printed."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.closed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.closed:
            return False
        if self.verbose or not record.name.startswith(PREFECT_RUN_LOGGERS):
            return True
        if record.levelno >= logging.ERROR or record.exc_info:
            return False
        return not record.getMessage().startswith(("Finished in state Failed", "Finished in state Crashed"))


def _console_handlers() -> list[logging.Handler]:
    """Handlers that write to the terminal, on the root logger and every configured logger."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    handlers = {id(h): h for logger in loggers for h in logger.handlers}
    return [
        handler
        for handler in handlers.values()
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def _setup_prefect_logging() -> None:
    """Prefect configures logging on first use, replacing the root logger's handlers; do it now,
    so the handlers added here stay (a later setup is incremental)."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()


class _FailedRuns(logging.Handler):
    """Remembers the Prefect task and flow runs that reported a failure (for the error paragraph)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.task_run: str | None = None
        self.flow_run: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not record.exc_info:
            return
        if record.name.startswith("prefect.task_runs") and self.task_run is None:
            self.task_run = getattr(record, "task_run_name", None)
        elif record.name.startswith("prefect.flow_runs") and self.flow_run is None:
            self.flow_run = getattr(record, "flow_run_name", None)

    def where(self) -> str | None:
        parts = [f"task run {self.task_run!r}" if self.task_run else None, f"flow run {self.flow_run!r}" if self.flow_run else None]
        named = [part for part in parts if part]
        return f"in {' of '.join(named)}" if named else None


class CommandLog:
    def __init__(self, command: str, verbose: bool) -> None:
        self.verbose = verbose
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = log_dir() / f"distill-{command}-{stamp}-{os.getpid()}.log"
        self.file_handler: logging.FileHandler | None = None
        self.console_filter = _QuietConsole(verbose)
        self.filtered: list[logging.Handler] = []
        self.failed_runs = _FailedRuns()

    def open(self) -> None:
        _setup_prefect_logging()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file_handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        except OSError as error:  # an unwritable log dir must not stop the command
            print(f"distill: no log file ({error}); set DISTILL_LOG_DIR to a writable directory", file=sys.stderr)
        else:
            self.file_handler.setLevel(logging.INFO)
            self.file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(self.file_handler)
            header = {"name": "distill", "levelno": logging.INFO, "levelname": "INFO", "msg": "distill %s"}
            self.file_handler.handle(logging.makeLogRecord(header | {"args": (" ".join(sys.argv[1:]),)}))
        logging.getLogger().addHandler(self.failed_runs)
        self.filtered = _console_handlers()
        for handler in self.filtered:
            for stale in [item for item in handler.filters if isinstance(item, _QuietConsole)]:
                handler.removeFilter(stale)  # left closed by an earlier failed command in this process
            handler.addFilter(self.console_filter)

    def close(self, keep: bool) -> None:
        if not self.console_filter.closed:  # after the error paragraph the terminal stays closed:
            for handler in self.filtered:  # Prefect logs its shutdown at exit, after the command
                handler.removeFilter(self.console_filter)
        logging.getLogger().removeHandler(self.failed_runs)
        if self.file_handler is not None:
            logging.getLogger().removeHandler(self.file_handler)
            self.file_handler.close()
            if not keep:
                self.path.unlink(missing_ok=True)

    def fail(self, error: BaseException) -> int:
        """Log the traceback, print the one error paragraph; the exit code (1)."""
        trace = "".join(traceback.format_exception(error))
        where = None
        if self.file_handler is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(f"\ndistill failed:\n{trace}")
                where = self.path
            except OSError:
                pass
        self.console_filter.closed = True  # nothing after the paragraph
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if self.verbose:
            print(trace, file=sys.stderr, end="")
        notes = [self.failed_runs.where()]
        if where is not None:
            notes.append(f"full traceback: {where}" + ("" if self.verbose else "; or rerun with --verbose"))
        message = error_message(error)
        if any(notes):
            message += "\n(" + "; ".join(note for note in notes if note) + ")"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1


PROJECT_PACKAGES = {"distillflow"}


def error_message(error: BaseException) -> str:
    """The error as one paragraph. Messages of the project's own errors, and of ValueError and
    OSError (config and file problems), are written for the user and shown as they are; any
    other error is shown with its type (`KeyError: 'x'`)."""
    text = str(error).strip()
    if isinstance(error, SystemExit):  # a command that exited with a message
        text = text.removeprefix("error:").strip()
    elif not text:
        text = type(error).__name__
    elif not (isinstance(error, ValueError | OSError) or type(error).__module__.split(".")[0] in PROJECT_PACKAGES):
        text = f"{type(error).__name__}: {text}"
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())  # no blank line inside


@contextlib.contextmanager
def command_log(command: str, verbose: bool) -> Iterator[CommandLog]:
    """The log of one command; kept only when the command failed with an error paragraph
    (whose path it prints), removed after a success or a Ctrl-C."""
    log = CommandLog(command, verbose)
    log.open()
    try:
        yield log
    finally:
        log.close(keep=log.console_filter.closed)

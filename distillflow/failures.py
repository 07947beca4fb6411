"""One paragraph per failed `distill` command; the traceback goes to a log file.

`command_log` wraps one command:

- a log file (`$DISTILL_LOG_DIR`, default `~/.local/state/distillflow/logs/`) receives
  every log record of the run at INFO and above, Prefect's flow and task logs included
  (they also reach the Prefect UI, as always), and the tracebacks of failed runs, which
  the Prefect UI does not get (`RunFailureReports`);
- on the terminal, Prefect's failure reports — the ERROR records of the `prefect.flow_runs`
  and `prefect.task_runs` loggers, which carry the same traceback once per task and once per
  flow, and their "Finished in state Failed" lines — are left out, unless `verbose`.

On a failure, `CommandLog.fail` appends the traceback to the file (and prints it with
`verbose`), then prints `error: <message>` and the file's path as the last paragraph on
stderr: the terminal takes no log record after it, up to the process's exit (Prefect logs
the stop of its temporary server then). Otherwise (success, Ctrl-C) the file is removed.

A write the file system refuses (a full disk, a used-up quota, a read-only mount) is the
one failure whose root cause is usually buried under secondary errors (a failed ROLLBACK
after SQLite's "database or disk is full", a relayed child-process error). Every writer of
the project's files raises `DiskWriteError` through `disk_writes`, whose message names the
path, the free space and the fix; `error_message` finds one anywhere in an error's chain,
and turns a bare ENOSPC/EDQUOT/EROFS `OSError` with a file name into one as well.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """Remembers the Prefect task and flow runs that reported a failure (for the error paragraph):
    a task run's traceback (at DEBUG for the project's own errors), a flow run's traceback or ERROR."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.task_run: str | None = None
        self.flow_run: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("prefect.task_runs") and record.exc_info and self.task_run is None:
            self.task_run = getattr(record, "task_run_name", None)
        elif (
            record.name.startswith("prefect.flow_runs")
            and (record.exc_info or record.levelno >= logging.ERROR)
            and self.flow_run is None
        ):
            self.flow_run = getattr(record, "flow_run_name", None)

    def where(self) -> str | None:
        parts = [f"task run {self.task_run!r}" if self.task_run else None, f"flow run {self.flow_run!r}" if self.flow_run else None]
        named = [part for part in parts if part]
        return f"in {' of '.join(named)}" if named else None


_COMMAND_LOGS: list[CommandLog] = []  # the `command_log`s open in this process


class _InfoAndTracebacks(logging.Filter):
    """The log file's records: INFO and above, and the failure reports `RunFailureReports` moved
    to DEBUG (their tracebacks); remembers whether it kept one."""

    def __init__(self) -> None:
        super().__init__()
        self.kept_traceback = False

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "distill_traceback", False):
            self.kept_traceback = True
            return True
        return record.levelno >= logging.INFO


class CommandLog:
    def __init__(self, command: str, verbose: bool) -> None:
        self.verbose = verbose
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = log_dir() / f"distill-{command}-{stamp}-{os.getpid()}.log"
        self.file_handler: logging.FileHandler | None = None
        self.console_filter = _QuietConsole(verbose)
        self.filtered: list[logging.Handler] = []
        self.failed_runs = _FailedRuns()
        self.tracebacks = _InfoAndTracebacks()

    def open(self) -> None:
        _setup_prefect_logging()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file_handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        except OSError as error:  # an unwritable log dir must not stop the command
            print(f"distill: no log file ({error}); set DISTILL_LOG_DIR to a writable directory", file=sys.stderr)
        else:
            self.file_handler.setLevel(logging.DEBUG)
            self.file_handler.addFilter(self.tracebacks)
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


def is_project_error(error: BaseException) -> bool:
    """Whether `error` is one the project raises on purpose (config, input, teacher, disk): its
    message is the paragraph a user reads, and running the same thing again fails the same way."""
    return isinstance(error, Exception) and type(error).__module__.split(".")[0] in PROJECT_PACKAGES


class RunFailureReports(logging.Filter):
    """Prefect's own reports of a run that failed with one of the project's errors go to DEBUG,
    traceback included: a task's "Task run failed with exception" and its "Finished in state
    Failed" line, a flow's "Encountered exception during execution". They stay out of the
    Prefect API (its UI lists DEBUG entries too) and go to the command's log file, or, for a
    run that no `distill` command runs in its process (`distill serve` and workers start one
    process per run), to `run_traceback_file(flow_run_id)`. The flow run logs the paragraph
    itself, once, at ERROR (`failed_run`)."""

    def __init__(self) -> None:
        super().__init__()
        self.error_types: set[str] = set()  # names of the project errors reported so far

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            message = record.getMessage() if record.name.startswith("prefect.flow_runs") else ""
            if message.startswith("Finished in state Failed(") and any(text in message for text in _REPORTED):
                record.msg, record.args = "Finished in state Failed (the error above)", ()
            return True
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_project_error(error):
            self.error_types.add(type(error).__name__)
        elif error is not None or not record.getMessage().startswith("Finished in state Failed"):
            return True
        elif not any(f"exception {name}:" in record.getMessage() for name in self.error_types):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.send_to_api = False  # Prefect's UI shows DEBUG: the run's page keeps the paragraph alone
        record.distill_traceback = True  # the command's log file keeps it (`CommandLog`)
        if not _COMMAND_LOGS:  # a run outside a `distill` command (a served or worker run): its own file
            _keep_in_run_file(record)
        return True


def run_traceback_file(flow_run_id: str) -> Path:
    """Where a flow run outside a `distill` command keeps the tracebacks of its failure."""
    return log_dir() / f"distill-run-{flow_run_id}.log"


def _keep_in_run_file(record: logging.LogRecord) -> None:
    try:
        path = run_traceback_file(str(getattr(record, "flow_run_id", None) or f"pid-{os.getpid()}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(logging.Formatter(LOG_FORMAT).format(record) + "\n")
    except OSError:  # the traceback is a help, never a second failure
        pass


_REPORTED: list[str] = []  # the openings of the paragraphs `failed_run` logged, latest last


def quiet_run_failure_reports() -> None:
    """Install `RunFailureReports` on Prefect's run loggers (once per process)."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(item, RunFailureReports) for item in logger.filters):
            logger.addFilter(RunFailureReports())


def failed_run(error: Exception) -> Any:
    """End the current flow run as Failed with the error's paragraph as its state message, logged
    once at ERROR with no traceback (that stays in the log file and at DEBUG). Calling the flow
    raises `error` again, so a command prints the same paragraph."""
    from distillflow.runs import get_run_logger
    from prefect.states import Failed

    message = error_message(error)
    get_run_logger().error("%s", message)
    _REPORTED.append(message[:200])  # Prefect's "Finished in state Failed(…)" line won't repeat it
    del _REPORTED[:-20]
    return Failed(message=message, data=error)


def fail_cleanly(command: Callable[..., Any], *args: Any) -> Any:
    """`command(*args)`, or, when it raises one of the project's errors, `failed_run` of it."""
    try:
        return command(*args)
    except Exception as error:
        if not is_project_error(error):
            raise
        return failed_run(error)


def error_message(error: BaseException) -> str:
    """The error as one paragraph. A refused write anywhere in the error's chain is the root
    cause and is shown instead (`disk_error_in`). Messages of the project's own errors, and of
    ValueError and OSError (config and file problems), are written for the user and shown as
    they are; any other error is shown with its type (`KeyError: 'x'`)."""
    refused = disk_error_in(error)
    if refused is not None:
        error = refused
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
    """The log of one command; kept when the command failed with an error paragraph (whose
    path it prints) or a flow run it ran failed (`distill serve`: the run's traceback is
    there), removed after a success or a Ctrl-C."""
    log = CommandLog(command, verbose)
    log.open()
    _COMMAND_LOGS.append(log)
    try:
        yield log
    finally:
        _COMMAND_LOGS.remove(log)
        log.close(keep=log.console_filter.closed or log.tracebacks.kept_traceback)


# -- writes the file system refuses ---------------------------------------------------------------


class DiskWriteError(Exception):
    """A write refused by the file system: no space left, quota exceeded, read-only, or
    permission denied. The message is the whole error paragraph (path, free space, fix)."""


FULL, QUOTA, READ_ONLY, DENIED = "full", "quota", "read-only", "denied"
_PROBLEM_OF_ERRNO = {errno.ENOSPC: FULL, errno.EDQUOT: QUOTA, errno.EROFS: READ_ONLY, errno.EACCES: DENIED}


def disk_problem(error: BaseException) -> str | None:
    """FULL, QUOTA, READ_ONLY or DENIED when `error` says the file system refused a write;
    None for any other error (and for SQLite's I/O errors, which say nothing about why:
    `disk_write_error` asks the file system about those)."""
    if isinstance(error, sqlite3.Error):
        name = getattr(error, "sqlite_errorname", "")
        if name.startswith("SQLITE_FULL"):
            return FULL
        if name.startswith("SQLITE_READONLY"):
            return READ_ONLY
        return None
    if not isinstance(error, OSError):
        return None
    if error.errno in _PROBLEM_OF_ERRNO:
        return _PROBLEM_OF_ERRNO[error.errno]
    text = str(error)  # pyarrow's OSError carries the errno only in its text
    return next((problem for code, problem in _PROBLEM_OF_ERRNO.items() if os.strerror(code) in text), None)


def filesystem_problem(path: Path) -> str | None:
    """What keeps `path` from being written, judged from its file system now: READ_ONLY,
    FULL (under 64 KiB free), DENIED, or None (SQLite reports these as a bare I/O error)."""
    where = _existing(path)
    try:
        stat = os.statvfs(where)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return READ_ONLY
    if stat.f_bavail * stat.f_frsize < 64 * 1024:
        return FULL
    if not os.access(where if where.is_dir() else where.parent, os.W_OK):
        return DENIED
    return None


def disk_write_error(error: BaseException, path: str | Path, what: str) -> DiskWriteError | None:
    """`error` met while writing `what` at `path` as a `DiskWriteError`, or None when the
    file system did not refuse the write."""
    path = Path(path)
    problem = disk_problem(error)
    if problem is None and getattr(error, "sqlite_errorname", "").startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")):
        problem = filesystem_problem(path)  # SQLite's bare "disk I/O error" / "unable to open database file"
    return DiskWriteError(disk_message(problem, path, what)) if problem else None


@contextlib.contextmanager
def disk_writes(path: str | Path, what: str) -> Iterator[None]:
    """Writes to `path` (`what` it is, e.g. "the teacher ledger"): one the file system refuses
    raises `DiskWriteError` (caused by the original error); any other error passes as it is."""
    try:
        yield
    except (OSError, sqlite3.Error) as error:
        refused = disk_write_error(error, path, what)
        if refused is None:
            raise
        raise refused from error


def disk_error_in(error: BaseException) -> DiskWriteError | None:
    """The first refused write in `error`'s chain (causes and contexts): a `DiskWriteError`,
    or an ENOSPC/EDQUOT/EROFS `OSError` naming its file (permission errors are left out:
    reads raise them too)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskWriteError):
            return current
        problem = disk_problem(current)
        if problem in (FULL, QUOTA, READ_ONLY) and isinstance(current, OSError):
            if current.filename:
                return DiskWriteError(disk_message(problem, Path(os.fsdecode(current.filename)), "a file"))
            return DiskWriteError(
                f"{problem_title(problem)}: a write failed ({current}) and named no path; `df -h` shows which file "
                "system it is. Free space there (or make it writable), then rerun the same command: it continues "
                "from what was written."
            )
        current = current.__cause__ or current.__context__
    return None


def disk_message(problem: str, path: Path, what: str) -> str:
    """The error paragraph of a refused write: what and where, the space left, the fix."""
    mount = _mount_point(_existing(path))
    try:
        usage = shutil.disk_usage(_existing(path))
        space = f"{_size(usage.free)} free of {_size(usage.total)} on {mount}"
    except OSError:
        space = f"free space on {mount} unknown"
    rerun = "then rerun the same command: it continues from what was written, and nothing written before is lost."
    if problem == FULL:
        return (
            f"{problem_title(FULL)}: writing {what} {path} failed ({space}). The run stopped at this first "
            f"failed write. Free space on {mount}, or move the output (output_dir) to a disk with room, {rerun}"
        )
    if problem == QUOTA:
        return (
            f"{problem_title(QUOTA)}: writing {what} {path} failed ({space}, but this user's quota there is used up). "
            f"The run stopped at this first failed write. Free space within the quota (`quota -s` shows it) or have "
            f"it raised, or move the output (output_dir) elsewhere, {rerun}"
        )
    if problem == READ_ONLY:
        return (
            f"{problem_title(READ_ONLY)}: cannot write {what} {path} ({mount} is mounted read-only; {space}). "
            f"Remount it read-write, or move the output (output_dir) to a writable directory, {rerun}"
        )
    parent = path.parent
    return (
        f"{problem_title(DENIED)}: cannot write {what} {path}. Make {parent} writable for this user (`ls -ld {parent}` "
        f"shows its owner), or move the output (output_dir) to a directory you own, {rerun}"
    )


def problem_title(problem: str) -> str:
    """The paragraph's first words for FULL, QUOTA, READ_ONLY or DENIED."""
    return {FULL: "no space left on the disk", QUOTA: "disk quota exceeded", READ_ONLY: "read-only file system"}.get(
        problem, "permission denied"
    )


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

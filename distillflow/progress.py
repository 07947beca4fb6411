"""Progress of long stages: a bar on a terminal, periodic log lines elsewhere.

    with progress("teacher", total=len(prompts), unit="answered") as bar:
        bar.advance(len(batch))

On a terminal (stderr is a TTY) the stage is a `rich` progress bar; when stderr is not a
terminal (CI, Prefect workers, a pipe to a file) it is one plain line every
`DISTILL_PROGRESS_INTERVAL_S` seconds (default 10) and a final line, with no carriage
returns or escape codes. `DISTILL_PROGRESS=bar|log|off` overrides the choice.

Inside a Prefect flow run, a reporter given an `artifact_key` also keeps a progress artifact
of that key (the run's Artifacts tab) at the percentage done, with the same line as its
description, at most once every `ARTIFACT_INTERVAL_S` seconds and once at the end. Every
reporter inside a flow run also sends its line to the run's log in the Prefect UI every
`RUN_LOG_INTERVAL_S` seconds (`DISTILL_RUN_LOG_INTERVAL_S`) and once at the end; those
records go to the API only (the terminal already has the bar or the log line).

Several stages may run at once (threads, nested stages): on a terminal they share one live
display, one bar each. A reporter is thread-safe; `advance` is cheap enough to call per row.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODES = ("bar", "log", "off")
DEFAULT_INTERVAL_S = 10.0
ARTIFACT_INTERVAL_S = 2.0  # the fastest a progress artifact is updated (one API call each)
FLUSH_TIMEOUT_S = 5.0  # the most a finishing stage waits for its last progress update
RUN_LOG_INTERVAL_S = 30.0  # the longest a running stage goes without a line in its run's log


def artifact_key_for(*parts: str) -> str:
    """A Prefect artifact key from names: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return slug[:80] or "progress"


def run_log_interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("DISTILL_RUN_LOG_INTERVAL_S", RUN_LOG_INTERVAL_S)))
    except ValueError:
        return RUN_LOG_INTERVAL_S


def _api_only_logger() -> logging.Logger:
    """A logger whose records reach the flow run's log in the Prefect UI and nothing else."""
    logger = logging.getLogger("distillflow.progress")
    if not logger.handlers:
        from prefect.logging.handlers import APILogHandler

        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def progress_mode() -> str:
    """`bar` on a terminal, `log` otherwise; `DISTILL_PROGRESS` overrides."""
    forced = os.environ.get("DISTILL_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    stream = sys.stderr
    is_tty = bool(getattr(stream, "isatty", None)) and stream.isatty()
    return "bar" if is_tty and os.environ.get("TERM") != "dumb" else "log"


def log_interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("DISTILL_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _SharedDisplay:
    """One rich live display for every bar open at the moment (rich allows one at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.progress: Any = None

    def open(self) -> Any:
        with self.lock:
            if self.progress is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    console=Console(file=sys.stderr),
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                self.progress.start()
            self.users += 1
            return self.progress

    def close(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.progress is not None:
                self.progress.stop()
                self.progress = None


_DISPLAY = _SharedDisplay()


class ProgressArtifact:
    """A Prefect progress artifact of the current flow run, updated at most every `every_s`."""

    def __init__(self, key: str, every_s: float = ARTIFACT_INTERVAL_S) -> None:
        self.key, self.every_s = key, every_s
        self.artifact_id: Any = None
        self.last_update = 0.0
        self.warned = False
        self._sender_lock = threading.Lock()
        self._pending: tuple[float, str] | None = None
        self._sending = False
        self._sender: threading.Thread | None = None

    @staticmethod
    def flow_run_id() -> str | None:
        """The id of the flow run this code runs in (also from inside its task runs), if any."""
        if "prefect" not in sys.modules:  # not inside a run: don't pay Prefect's import
            return None
        from prefect.context import FlowRunContext, TaskRunContext

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:
            return str(context.flow_run.id)
        task = TaskRunContext.get()
        return str(task.task_run.flow_run_id) if task is not None and task.task_run.flow_run_id else None

    def start(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = self._call(create_progress_artifact, percent, key=self.key, description=description)
        self.last_update = time.monotonic()

    def due(self, now: float) -> bool:
        """Whether an update now keeps to the interval (claims it when it does; call under a lock)."""
        if self.artifact_id is None or now - self.last_update < self.every_s:
            return False
        self.last_update = now
        return True

    def update(self, percent: float, description: str) -> None:
        """Send the latest value from a background thread: a slow or unreachable server must
        never hold up the stage (an update waiting on a call in flight is folded into the next)."""
        if self.artifact_id is None:
            return
        with self._sender_lock:
            self._pending = (percent, description)
            if self._sending:
                return
            self._sending = True
            context = contextvars.copy_context()
            self._sender = threading.Thread(target=context.run, args=(self._send,), daemon=True, name="progress-artifact")
            self._sender.start()

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait (at most `timeout_s`) for the last value to reach the server."""
        sender = self._sender
        if sender is not None:
            sender.join(timeout_s)

    def _send(self) -> None:
        from prefect.artifacts import update_progress_artifact

        while True:
            with self._sender_lock:
                item, self._pending = self._pending, None
                if item is None:
                    self._sending = False
                    return
            self._call(update_progress_artifact, self.artifact_id, item[0], description=item[1])

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """The API call; a refused one is logged once and never stops the stage it reports on."""
        try:
            return function(*args, **kwargs)
        except Exception as error:  # the artifact is a view of the work, not the work
            if not self.warned:
                self.warned = True
                from prefect.logging import get_logger

                get_logger("distillflow.progress").warning("progress artifact %r not updated: %r", self.key, error)
            return None


class ProgressBar:
    """Counts work done in one stage; shown as a bar or as periodic log lines (see module doc).

    Calling the reporter (`bar(n)`) is the same as `bar.advance(n)`, so it can be handed to
    code that expects a `progress(count)` callback.
    """

    def __init__(
        self, label: str, total: int | None, unit: str = "rows", mode: str | None = None, artifact_key: str | None = None
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.artifact = ProgressArtifact(artifact_key) if artifact_key is not None else None
        self.mode = mode or progress_mode()
        self.every_s = log_interval_s()
        self.done = 0
        self.started = self.last_line = self.last_advance = time.monotonic()
        self._lock = threading.Lock()
        self._task_id = None
        self._rich = None
        self._final_logged = False
        self.detail = ""  # e.g. the last loss, shown after the counts
        self.flow_run_id: str | None = None  # set when the stage runs inside a flow run
        self.run_log_every_s = run_log_interval_s()
        self.last_run_log = self.started

    # -- reporting ------------------------------------------------------------------------

    def advance(self, count: int = 1) -> None:
        self.update(completed=None, advance=count)

    __call__ = advance

    def update(
        self, completed: int | None = None, total: int | None = None, advance: int = 0, detail: str | None = None
    ) -> None:
        """Set the count (`completed`), the `total`, or add `advance`; `detail` (e.g. the
        latest loss) is shown after the counts from now on."""
        with self._lock:
            if detail is not None:
                self.detail = detail
            if total is not None:
                self.total = total
            if completed is not None:
                self.done = completed
            self.done += advance
            now = time.monotonic()
            if advance or completed is not None:
                self.last_advance = now
            line = None
            if self.mode == "log":
                finished = self.total is not None and self.done >= self.total
                if (now - self.last_line >= self.every_s and self.every_s > 0) or self.every_s == 0 or (
                    finished and not self._final_logged
                ):
                    self.last_line = now
                    self._final_logged = finished
                    line = self._line(now)
            pushed = self.artifact is not None and self.artifact.due(now)
            percent, text = self.percent(), self._line(now) if pushed else ""
            run_line = None
            if self.flow_run_id is not None and now - self.last_run_log >= self.run_log_every_s:
                self.last_run_log = now
                run_line = self._line(now)
        if self.mode == "bar" and self._rich is not None:
            self._rich.update(self._task_id, completed=self.done, total=self.total)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        if pushed:
            assert self.artifact is not None
            self.artifact.update(percent, text)
        if run_line is not None:
            self._to_run_log(run_line)

    def _to_run_log(self, line: str) -> None:
        try:
            _api_only_logger().info(line, extra={"flow_run_id": self.flow_run_id})
        except Exception:  # noqa: BLE001 - the run's log is a view of the work, not the work
            pass

    def percent(self) -> float:
        """Done as a percentage of the total (0 while the total is unknown or 0)."""
        return min(100.0, 100.0 * self.done / self.total) if self.total else 0.0

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        text = f"[{self.label}] {self.done}{of} {self.unit} ({rate:.1f}/s, {_duration(elapsed)}"
        if self.total is not None and 0 < self.done < self.total and rate > 0:
            text += f", eta {_duration((self.total - self.done) / rate)}"
        return text + ")" + (f" {self.detail}" if self.detail else "")

    def status(self) -> str:
        """One phrase for a heartbeat of a stage that seems stuck."""
        with self._lock:
            of = f"/{self.total}" if self.total is not None else ""
            return f"{self.done}{of} {self.unit}, the last {time.monotonic() - self.last_advance:.0f} s ago"

    # -- lifetime -------------------------------------------------------------------------

    def _start(self) -> None:
        flow_run_id = ProgressArtifact.flow_run_id()
        if flow_run_id is not None:
            self.flow_run_id = flow_run_id
            if self.total is not None:  # a stage of unknown size shows up once it counts something
                self._to_run_log(f"[{self.label}] started: {self.total} {self.unit}")
            if self.artifact is not None:
                self.artifact.start(self.percent(), self._line(time.monotonic()))
        if self.mode == "bar":
            self._rich = _DISPLAY.open()
            self._task_id = self._rich.add_task(self.label, total=self.total, completed=self.done, unit=self.unit)

    def _finish(self, failed: bool) -> None:
        if self.flow_run_id is not None and (self.done or self.total is not None):
            self._to_run_log(self._line(time.monotonic()) + (" stopped" if failed else " done"))
        if self.artifact is not None:
            self.artifact.update(self.percent() if failed else 100.0, self._line(time.monotonic()) + (" stopped" if failed else " done"))
            self.artifact.flush()
        if self.mode == "bar" and self._rich is not None:
            self._rich.update(self._task_id, completed=self.done, total=self.total)
            self._rich = None
            _DISPLAY.close()
        elif self.mode == "log" and (failed or not self._final_logged) and (self.done or self.total is not None):
            with self._lock:
                self._final_logged = True
                line = self._line(time.monotonic())
            print(line + (" stopped" if failed else " done"), file=sys.stderr, flush=True)


    @contextmanager
    def shown(self) -> Iterator[ProgressBar]:
        """Display the bar (or its final log line) while the block runs. Counting may start
        before (e.g. work a resumed run already has), and is shown from the first frame."""
        self._start()
        try:
            yield self
        except BaseException:
            self._finish(failed=True)
            raise
        self._finish(failed=False)


@contextmanager
def progress(
    label: str, total: int | None = None, unit: str = "rows", artifact_key: str | None = None
) -> Iterator[ProgressBar]:
    """Report the progress of one stage (see the module doc); `total=None` when unknown."""
    with ProgressBar(label, total, unit, artifact_key=artifact_key).shown() as bar:
        yield bar

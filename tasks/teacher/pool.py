"""Teacher requests from client processes of their own.

One Python process issues about 1,000 chat requests a second through the openai client on
one core (aiohttp transport, a 2-core VM); a local vLLM serving short answers takes more.
With `teacher.client_processes: P > 1` the run starts P client processes, each with its own
event loop, `AsyncOpenAI` client and connection pool, its share of `max_concurrency` and
1/P of the rate limits. A large build (tasks/build/teacher_stage.py `requests_from_own_process`) runs its
one client process this way too, so that the request loop does not share an interpreter
lock with Prefect's task threads and the flow's bookkeeping.

Each client process is a fresh interpreter on client_process.py (tasks/child.py: never a re-run
of the caller's script, never a fork of a threaded process), and receives its settings and
the API key over its pipe, never on its command line. It records every answer in the run's
ledger with a `Recording` of its own (SQLite WAL takes writers from several processes) in one transaction per turn of
its event loop, then sends that turn's answers to the parent in one message, so "nothing
lost, nothing paid twice" is the same as with one process: a SIGKILL of the parent loses at
most the requests in flight (the workers see their pipe close, cancel them and exit). Each
worker has its own fail-fast gate, so a wrong key costs at most one call per process. A
worker that dies fails the batches waiting on it; their answers so far are in the ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.records import BUDGET_REASON, TeacherAnswer
from distillflow.tasks.child import start_child
from distillflow.tasks.teacher.budget import SpendingBudget
from distillflow.tasks.teacher.errors import TeacherFatalError
from distillflow.tasks.teacher.protocol import Messages, TeacherStats
from distillflow.tasks.teacher.recording import Recording

CLIENT_PROCESS = "distillflow.tasks.teacher.client_process"  # the module each client process runs


def share_of(config: TeacherConfig, share: int, processes: int) -> TeacherConfig:
    """Worker `share`'s slice of the limits: concurrency split as evenly as integers allow
    (at least 1 each), requests/tokens per minute divided by the number of processes."""
    concurrency = config.max_concurrency // processes + (1 if share < config.max_concurrency % processes else 0)
    return config.model_copy(
        update={
            "max_concurrency": max(1, concurrency),
            "requests_per_minute": config.requests_per_minute / processes if config.requests_per_minute else None,
            "tokens_per_minute": config.tokens_per_minute / processes if config.tokens_per_minute else None,
            "client_processes": 1,
        }
    )


@dataclass
class _Job:
    results: list[TeacherAnswer | None]
    remaining: int
    on_answer: Callable[[int, TeacherAnswer, float], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ClientPool:
    """P client processes behind one `answer(messages_list, on_answer)` call, which several
    threads (concurrent batch tasks) may make at once."""

    def __init__(self, config: TeacherConfig, api_key: str, processes: int) -> None:
        self.processes: list[subprocess.Popen] = []
        self.connections: list[Any] = []  # to each process
        self.replies: list[Any] = []  # from each process
        self.send_locks: list[threading.Lock] = []
        self.jobs: dict[int, _Job] = {}
        self.lock = threading.Lock()
        self.job_ids = itertools.count()
        self.fatal: BaseException | None = None
        self.closing = False
        self.aborted = False
        self.broken: BaseException | None = None  # a worker died: every later batch fails at once
        self.stats_replies: queue.Queue[dict[str, Any]] = queue.Queue()
        for share in range(processes):
            process, to_child, from_child = start_child(CLIENT_PROCESS)  # tasks/child.py
            self.processes.append(process)
            self.connections.append(to_child)
            self.replies.append(from_child)
            self.send_locks.append(threading.Lock())
            try:  # the child reads it once its imports are done; the pipe holds it meanwhile
                to_child.send(("start", share_of(config, share, processes).model_dump_json(), api_key, 1.0 / processes))
            except OSError:
                pass  # it died at once: its receiver reports the exit code
        for share in range(processes):
            threading.Thread(target=self._receive, args=(share,), name=f"teacher-client-{share}-answers", daemon=True).start()

    def answer(
        self,
        messages_list: Sequence[Messages],
        on_answer: Callable[[int, TeacherAnswer, float], None] | None = None,
        ledger_path: str | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[TeacherAnswer]:
        """Answers in input order. With `ledger_path` and `keys`, the workers record each
        answer under its key first; `on_answer(index, answer, created_at)` runs after."""
        if self.fatal is not None:
            raise self.fatal
        count = len(messages_list)
        if count == 0:
            return []
        job = _Job([None] * count, count, on_answer)
        job_id = next(self.job_ids)
        with self.lock:
            if self.broken is not None:
                raise self.broken
            self.jobs[job_id] = job
        processes = len(self.connections)
        try:
            for share, (connection, send_lock) in enumerate(zip(self.connections, self.send_locks)):
                indices = list(range(share, count, processes))  # interleaved: shares finish together
                if indices:
                    try:
                        with send_lock:
                            connection.send((
                                "job", job_id, indices, [messages_list[i] for i in indices], ledger_path,
                                [keys[i] for i in indices] if keys is not None else None,
                            ))
                    except OSError as error:  # the worker is gone (its receiver reports why)
                        self._fail(self.broken or RuntimeError(f"teacher client process {share} is gone: {error}"), job_id)
            job.done.wait()
        finally:
            with self.lock:
                self.jobs.pop(job_id, None)
        if job.error is not None:
            raise job.error
        return job.results  # type: ignore[return-value]

    def _fail(self, error: BaseException, job_id: int | None = None) -> None:
        """Fail one job, or every job when `job_id` is None."""
        with self.lock:
            if job_id is None:
                targets = list(self.jobs.values())
            else:
                targets = [self.jobs[job_id]] if job_id in self.jobs else []
        for job in targets:
            if job.error is None:
                job.error = error
            job.done.set()

    def _receive(self, share: int) -> None:
        connection = self.replies[share]
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                if not self.closing:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.processes[share].wait(1.0)
                    code = self.processes[share].returncode
                    with self.lock:
                        self.broken = self.broken or RuntimeError(
                            f"teacher client process {share} exited unexpectedly (exit code {code}); "
                            "answers received so far are in the ledger, rerun to finish"
                        )
                    self._fail(self.broken)
                return
            kind = message[0]
            if kind == "answers":
                _, job_id, answers = message
                with self.lock:
                    job = self.jobs.get(job_id)
                if job is None:
                    continue
                try:
                    for index, answer, created_at in answers:
                        job.results[index] = answer
                        if job.on_answer is not None:  # recorded even after another worker failed
                            job.on_answer(index, answer, created_at)
                except BaseException as error:  # noqa: BLE001 - e.g. the caller's callback failed
                    self._fail(error, job_id)
                    continue
                with self.lock:
                    job.remaining -= len(answers)
                    finished = job.remaining == 0
                if finished:
                    job.done.set()
            elif kind == "fatal":  # the error itself: a TeacherFatalError, or the ledger's DiskWriteError
                self.fatal = self.fatal or message[2]
                self._fail(self.fatal)
            elif kind == "error":
                self._fail(RuntimeError(f"teacher client process {share}: {message[2]}"), message[1])
            elif kind == "stats":
                self.stats_replies.put(message[1])

    def abort(self, error: BaseException) -> None:
        """Stop now, from any thread: every waiting and later batch raises `error`, and the
        workers cancel their requests in flight and exit (what they recorded stays recorded)."""
        self.fatal = self.fatal or error
        self.closing = True  # the workers' exits that follow are expected
        self.aborted = True  # `close` asks no stats: the workers are already stopping
        self._fail(self.fatal)
        self._send_stop()

    def _send_stop(self) -> None:
        """Ask every worker to stop (a worker that is already gone is skipped)."""
        for connection, send_lock in zip(self.connections, self.send_locks):
            try:
                with send_lock:
                    connection.send(("stop",))
            except (BrokenPipeError, OSError):
                pass

    def close(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Stop the workers; returns each live worker's stats (requests, retries, tokens)."""
        stats: list[dict[str, Any]] = []
        asked = 0
        for process, connection, send_lock in zip(self.processes, self.connections, self.send_locks):
            if self.aborted or process.poll() is not None:  # a dead worker's counts are lost with it
                continue
            try:
                with send_lock:
                    connection.send(("stats",))
                asked += 1
            except (BrokenPipeError, OSError):
                pass
        for _ in range(asked):
            try:
                stats.append(self.stats_replies.get(timeout=timeout_s))
            except queue.Empty:
                break
        self.closing = True
        self._send_stop()
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        for connection in [*self.connections, *self.replies]:
            with contextlib.suppress(OSError):
                connection.close()
        for process in self.processes:
            for stream in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
        return stats


class PooledTeacher:
    """The `Teacher` of `teacher.client_processes: P > 1`: requests go out from P client
    processes (each an `OpenAITeacher` with 1/P of the limits and of the budget), which
    record every answer in the ledger themselves the moment it arrives."""

    concurrent = True

    def __init__(self, config: TeacherConfig, api_key: str, start: bool = False) -> None:
        """`start`: start the processes now, so that their start-up (about a second of
        imports) overlaps the caller's work until the first request, rather than delaying it."""
        self.config = config
        self.stats = TeacherStats()
        # The run's budget as the parent sees it: spent once a process refused a request
        # (each process holds its own share and reports its spending in `stats`).
        self.budget = SpendingBudget(config)
        self._api_key = api_key
        self._pool: ClientPool | None = None
        self._lock = threading.Lock()
        if start:
            self.pool()

    @property
    def model(self) -> str:
        return self.config.model

    def pool(self) -> ClientPool:
        """The client processes, started on first use."""
        with self._lock:
            if self._pool is None:
                self._pool = ClientPool(self.config, self._api_key, max(1, self.config.client_processes))
            return self._pool

    def _note(self, answer: TeacherAnswer) -> None:
        if answer.error == BUDGET_REASON:
            self.budget.exhausted = True
            self.budget.refused += 1

    def answer_sync(
        self, messages_list: Sequence[Messages], on_answer: Callable[[int, TeacherAnswer], None] | None = None
    ) -> list[TeacherAnswer]:
        """Answers in input order, without the ledger."""

        def callback(index: int, answer: TeacherAnswer, _created_at: float) -> None:
            self._note(answer)
            if on_answer is not None:
                on_answer(index, answer)

        return self.pool().answer(messages_list, callback)

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        """Answers are recorded by the client processes (each with a `Recording` of the same
        ledger and keys); here they are only passed on."""

        def noted(index: int, answer: TeacherAnswer, created_at: float) -> None:
            self._note(answer)
            recording.already_recorded(index, answer, created_at)

        self.pool().answer(messages_list, noted, ledger_path=str(recording.ledger.path), keys=list(recording.keys))

    def abort(self, error: TeacherFatalError) -> None:
        with self._lock:
            pool = self._pool
        if pool is not None:
            pool.abort(error)

    def close(self) -> None:
        """Stop the processes; their request and token counts are added to `stats`."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for worker_stats in pool.close():
                self.stats.add(worker_stats)



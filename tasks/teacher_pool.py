"""Teacher requests from client processes of their own.

One Python process issues about 1,000 chat requests a second through the openai client on
one core (aiohttp transport, a 2-core VM); a local vLLM serving short answers takes more.
With `teacher.client_processes: P > 1` the run starts P client processes, each with its own
event loop, `AsyncOpenAI` client and connection pool, its share of `max_concurrency` and
1/P of the rate limits. A large build (flows/build.py `requests_from_own_process`) runs its
one client process this way too, so that the request loop does not share an interpreter
lock with Prefect's task threads and the flow's bookkeeping.

Each client process is a fresh interpreter on this module (tasks/child.py: never a re-run
of the caller's script, never a fork of a threaded process), and receives its settings and
the API key over its pipe, never on its command line. It records every answer in the run's
ledger (SQLite WAL takes writers from several processes) in one transaction per turn of
its event loop, then sends that turn's answers to the parent in one message, so "nothing
lost, nothing paid twice" is the same as with one process: a SIGKILL of the parent loses at
most the requests in flight (the workers see their pipe close, cancel them and exit). Each
worker has its own fail-fast gate, so a wrong key costs at most one call per process. A
worker that dies fails the batches waiting on it; their answers so far are in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.failures import DiskWriteError
from distillflow.records import TeacherAnswer
from distillflow.storage.ledger import Ledger
from distillflow.tasks.child import child_connections, start_child
from distillflow.tasks.teacher import (
    BUDGET_REASON,
    OpenAITeacher,
    SpendingBudget,
    TeacherFatalError,
    TeacherStats,
    request_loop_gc,
)

Messages = list[dict[str, Any]]


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


# -- worker process -----------------------------------------------------------------------------


def main() -> None:
    """`python -m distillflow.tasks.teacher_pool` (tasks/child.py): a ("start", config JSON,
    API key, share) message, then jobs until told to stop or until the parent goes away.
    `share`: this process's part of the run's budget and of the remaining requests/tokens
    the API's rate-limit headers report. The key comes over the pipe, never on a command line."""
    receive, reply = child_connections()
    try:
        _, config_json, api_key, share = receive.recv()
    except (EOFError, OSError):
        return
    teacher = OpenAITeacher(TeacherConfig.model_validate_json(config_json), api_key=api_key, share=share)
    asyncio.run(_serve(receive, reply, teacher))


async def _serve(receive: Any, reply: Any, teacher: OpenAITeacher) -> None:
    teacher.shared_parts()  # the client, before the first job (the parent is still busy then)
    # What exists now (imports, the client) lives as long as this process: the collector
    # stops walking it (tasks/teacher.py `request_loop_gc`); today's garbage goes first.
    gc.collect()
    with request_loop_gc():
        await _answer_jobs(receive, reply, teacher)


async def _answer_jobs(receive: Any, reply: Any, teacher: OpenAITeacher) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                message = receive.recv()
            except (EOFError, OSError):  # the parent is gone
                message = ("stop",)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="teacher-client-inbox", daemon=True).start()

    def send(message: tuple) -> None:
        try:
            reply.send(message)
        except (BrokenPipeError, EOFError, OSError):
            pass  # the parent is gone; the reader thread stops the loop

    ledgers: dict[str, Ledger] = {}

    async def run_job(
        job_id: int, indices: list[int], messages_list: list[Messages], ledger_path: str | None, keys: list[str] | None
    ) -> None:
        # Answers go to the parent in one message per turn of the loop, each after the
        # ledger commit that holds it (the worker's group commit, tasks/teacher.py).
        outbox: list[tuple[int, TeacherAnswer, float]] = []

        def flush() -> None:
            if outbox:
                send(("answers", job_id, outbox[:]))
                outbox.clear()

        def out(position: int, answer: TeacherAnswer, created_at: float) -> None:
            if not outbox:
                loop.call_soon(flush)
            outbox.append((indices[position], answer, created_at))

        try:
            # One client, concurrency limit and rate limiter for all of this process's jobs.
            if ledger_path is not None and keys is not None:
                ledger = ledgers.get(ledger_path)
                if ledger is None:  # (not `or`: an empty Ledger is falsy)
                    ledger = ledgers[ledger_path] = Ledger(ledger_path)
                await teacher.answer_and_record_async(messages_list, keys, ledger, out)
            else:
                await teacher.answer_shared(messages_list, lambda position, answer: out(position, answer, time.time()))
        except (TeacherFatalError, DiskWriteError) as error:  # the run stops: every job fails with it
            flush()
            send(("fatal", job_id, error))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the batch
            flush()
            send(("error", job_id, f"{type(error).__name__}: {error}"))
        else:
            flush()

    jobs: set[asyncio.Task] = set()
    try:
        while True:
            message = await inbox.get()
            if message[0] == "job":
                job = asyncio.create_task(run_job(*message[1:]))
                jobs.add(job)
                job.add_done_callback(jobs.discard)
            elif message[0] == "stats":
                send(("stats", teacher.stats.to_dict()))
            else:  # stop
                break
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await teacher.aclose()
        for ledger in ledgers.values():
            ledger.close()


# -- parent side --------------------------------------------------------------------------------


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
            process, to_child, from_child = start_child(__name__)  # tasks/child.py
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

    def answer_and_record(
        self,
        messages_list: Sequence[Messages],
        keys: Sequence[str],
        ledger: Ledger,
        on_recorded: Callable[[int, TeacherAnswer, float], None],
    ) -> None:
        def noted(index: int, answer: TeacherAnswer, created_at: float) -> None:
            self._note(answer)
            on_recorded(index, answer, created_at)

        self.pool().answer(messages_list, noted, ledger_path=str(ledger.path), keys=list(keys))

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


if __name__ == "__main__":
    main()

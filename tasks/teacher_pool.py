"""Teacher requests from several client processes, for teachers faster than one core can ask.

One Python process issues about 500-600 chat requests a second through the openai client
on one core (aiohttp transport, a 2-core VM); a local vLLM serving short answers takes
more. With `teacher.client_processes: P > 1` the run starts P worker processes (spawn),
each with its own event loop, `AsyncOpenAI` client and connection pool, its share of
`max_concurrency` and 1/P of the rate limits.

Each worker records every answer in the run's ledger (SQLite WAL takes writers from
several processes) the moment it arrives, then sends it to the parent, so "nothing lost,
nothing paid twice" is the same as with one process: a SIGKILL of the parent loses at most
the requests in flight (the workers see their pipe close, cancel them and exit). Each worker has its own fail-fast gate, so a wrong key costs at most one
call per process. A worker that dies fails the batches waiting on it; their answers so
far are in the ledger.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.records import TeacherAnswer
from distillflow.storage.ledger import Ledger

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


def worker_main(connection: Any, config_json: str, api_key: str, share: float = 1.0) -> None:
    """Entry point of a client process: answer jobs from `connection` until told to stop
    or until the parent goes away. `share`: this process's part of the run's budget and
    of the remaining requests/tokens the API's rate-limit headers report."""
    from distillflow.tasks.teacher import OpenAITeacher

    teacher = OpenAITeacher(TeacherConfig.model_validate_json(config_json), api_key=api_key, share=share)
    asyncio.run(_serve(connection, teacher))


async def _serve(connection: Any, teacher: Any) -> None:
    from distillflow.tasks.teacher import TeacherFatalError, record_answer

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):  # the parent is gone
                message = ("stop",)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="teacher-client-inbox", daemon=True).start()
    def send(message: tuple) -> None:
        try:
            connection.send(message)
        except (BrokenPipeError, EOFError, OSError):
            pass  # the parent is gone; the reader thread stops the loop

    ledgers: dict[str, Ledger] = {}

    async def run_job(
        job_id: int, indices: list[int], messages_list: list[Messages], ledger_path: str | None, keys: list[str] | None
    ) -> None:
        ledger = None
        if ledger_path is not None:
            ledger = ledgers.get(ledger_path)
            if ledger is None:  # (not `or`: an empty Ledger is falsy)
                ledger = ledgers[ledger_path] = Ledger(ledger_path)

        def on_answer(position: int, answer: TeacherAnswer) -> None:
            if ledger is not None and keys is not None:
                created_at = record_answer(ledger, keys[position], answer)  # durable before anything else
            else:
                created_at = time.time()
            send(("answer", job_id, indices[position], answer, created_at))

        try:
            # One client, concurrency limit and rate limiter for all of this process's jobs.
            await teacher._answer_all_shared(messages_list, on_answer)
        except TeacherFatalError as error:
            send(("fatal", job_id, str(error)))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the batch
            send(("error", job_id, f"{type(error).__name__}: {error}"))

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
        if teacher._shared is not None:
            await teacher._shared[0].close()
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
        context = multiprocessing.get_context("spawn")  # never fork a process with threads
        self.processes: list[Any] = []
        self.connections: list[Any] = []
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
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(child_end, share_of(config, share, processes).model_dump_json(), api_key, 1.0 / processes),
                name=f"teacher-client-{share}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self.processes.append(process)
            self.connections.append(parent_end)
            self.send_locks.append(threading.Lock())
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
        from distillflow.tasks.teacher import TeacherFatalError

        connection = self.connections[share]
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                if not self.closing:
                    self.processes[share].join(1.0)
                    code = self.processes[share].exitcode
                    with self.lock:
                        self.broken = self.broken or RuntimeError(
                            f"teacher client process {share} exited unexpectedly (exit code {code}); "
                            "answers received so far are in the ledger, rerun to finish"
                        )
                    self._fail(self.broken)
                return
            kind = message[0]
            if kind == "answer":
                _, job_id, index, answer, created_at = message
                with self.lock:
                    job = self.jobs.get(job_id)
                if job is None:
                    continue
                job.results[index] = answer
                try:
                    if job.on_answer is not None:  # recorded even after another worker failed
                        job.on_answer(index, answer, created_at)
                except BaseException as error:  # noqa: BLE001 - e.g. the ledger's disk is full
                    self._fail(error, job_id)
                    continue
                with self.lock:
                    job.remaining -= 1
                    finished = job.remaining == 0
                if finished:
                    job.done.set()
            elif kind == "fatal":
                self.fatal = self.fatal or TeacherFatalError(message[2])
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
            if self.aborted or not process.is_alive():  # a dead worker's counts are lost with it
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
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout_s)
        for connection in self.connections:
            connection.close()
        return stats

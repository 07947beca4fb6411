"""A teacher client process: `python -m distillflow.tasks.teacher.client_process`, started
by `ClientPool` (pool.py) through tasks/child.py.

It answers the jobs its parent sends with an `OpenAITeacher` of its own (its share of the
run's limits and budget), records every answer in the run's ledger with a `Recording`
(recording.py: one transaction per turn of its event loop), then sends that turn's answers
to the parent in one message. When the parent goes away (its pipe closes), the requests in
flight are cancelled and the process exits.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.failures import DiskWriteError
from distillflow.records import TeacherAnswer
from distillflow.storage.ledger import Ledger
from distillflow.tasks.child import child_connections
from distillflow.tasks.teacher.errors import TeacherFatalError
from distillflow.tasks.teacher.loop_gc import request_loop_gc
from distillflow.tasks.teacher.openai_client import OpenAITeacher
from distillflow.tasks.teacher.protocol import Messages
from distillflow.tasks.teacher.recording import Recording


def main() -> None:
    """`python -m distillflow.tasks.teacher.client_process` (tasks/child.py): a ("start", config JSON,
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
    # stops walking it (loop_gc.py `request_loop_gc`); today's garbage goes first.
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
        # ledger commit that holds it (the recording's group commit, recording.py).
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
                await teacher.answer_async(messages_list, Recording(ledger, keys, out, on_failure=teacher.abort))
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



if __name__ == "__main__":
    main()

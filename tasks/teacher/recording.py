"""The ledger in front of any teacher transport: the one place answers are recorded.

`answer_requests` takes from the ledger the answers already paid for, asks the transport
for the rest, and counts failures against the run's `FailureBudget`. The transport hands
each answer to a `Recording`, which puts it in the ledger under its request's key the
moment it arrives and only then passes it on, so a crash loses at most the requests on the
wire. A transport that answers from an event loop (`OpenAITeacher`) hands answers to
`answered_grouped`: those of one turn of the loop are committed in one transaction (see
`GroupCommit`). A client process (tasks/teacher/client_process.py) records with a
`Recording` of its own and its parent reports the answers with `already_recorded`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.records import TeacherAnswer, is_recordable
from distillflow.storage.ledger import Ledger, request_key
from distillflow.tasks.teacher.budget import FailureBudget
from distillflow.tasks.teacher.protocol import Messages, Teacher, TeacherStats


class GroupCommit:
    """Ledger writes of one event loop, grouped: `add` queues an answer and returns
    (its created_at, a future done once it is committed); the queue is committed in one
    transaction by a callback at the end of the current turn of the loop.

    A commit that fails (a full disk) fails its future, which the waiting workers raise,
    and calls `on_failure` with the error at once (the teacher aborts the run: no request
    goes out after it); every later `add` fails the same way without trying again. The
    loop callback itself never raises: asyncio would print its traceback."""

    def __init__(
        self,
        ledger: Ledger,
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        self.ledger, self.loop, self.on_failure = ledger, loop, on_failure
        self.pending: list[tuple[str, TeacherAnswer, float]] = []
        self.committed: asyncio.Future | None = None
        self.failed: Exception | None = None

    def add(self, key: str, answer: TeacherAnswer) -> tuple[float, asyncio.Future]:
        created_at = time.time()
        if self.failed is not None:
            return created_at, self._failed_future(self.failed)
        if self.committed is None:
            self.committed = self.loop.create_future()
            self.loop.call_soon(self.flush)
        self.pending.append((key, answer, created_at))
        return created_at, self.committed

    def flush(self) -> None:
        """Commit what is queued now (on the loop's thread)."""
        pending, committed = self.pending, self.committed
        self.pending, self.committed = [], None
        if committed is None:
            return
        # A worker cancelled while it waited (Ctrl-C, `abort`) cancels this shared future with
        # it; the answers are committed all the same.
        try:
            self.ledger.put_many(pending)
        except Exception as error:  # noqa: BLE001 - raised by the workers waiting on `committed`
            self.failed = error
            if not committed.done():
                committed.set_exception(error)
                committed.exception()  # a caller that was cancelled meanwhile will not read it
            if self.on_failure is not None:
                self.on_failure(error)
            return
        if not committed.done():
            committed.set_result(None)

    def _failed_future(self, error: Exception) -> asyncio.Future:
        future = self.loop.create_future()
        future.set_exception(error)
        future.exception()  # marked read: it may be dropped unread when its worker is cancelled
        return future


def record_answer(ledger: Ledger, key: str, answer: TeacherAnswer) -> float:
    """Put `answer` in the ledger under `key` when it is worth keeping; its created_at."""
    return ledger.put(key, answer) if is_recordable(answer) else time.time()


class Recording:
    """Where one call's answers go: each recordable answer into `ledger` under `keys[index]`,
    then `on_recorded(index, answer, created_at)`. A ledger commit that fails calls
    `on_failure` with its error (the teacher aborts the run) before the error is raised."""

    def __init__(
        self,
        ledger: Ledger,
        keys: Sequence[str],
        on_recorded: Callable[[int, TeacherAnswer, float], None],
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        self.ledger, self.keys, self.on_recorded, self.on_failure = ledger, keys, on_recorded, on_failure
        self.commits: GroupCommit | None = None  # made by the first `answered_grouped`, on its loop

    def part(
        self,
        indices: Sequence[int],
        on_recorded: Callable[[int, TeacherAnswer, float], None],
        on_failure: Callable[[Exception], None] | None = None,
    ) -> Recording:
        """A recording of the requests at `indices` only (a part sent elsewhere, e.g. to one
        replica), into the same ledger; `on_recorded` gets positions in `indices`."""
        return Recording(self.ledger, [self.keys[index] for index in indices], on_recorded, on_failure)

    def record(self, key: str, answer: TeacherAnswer) -> float:
        """Put `answer` in the ledger under `key` now, when it is worth keeping; its created_at."""
        return record_answer(self.ledger, key, answer)

    def answered(self, index: int, answer: TeacherAnswer) -> None:
        """Request `index` has its answer: recorded now, then passed on."""
        self.on_recorded(index, answer, self.record(self.keys[index], answer))

    def answered_grouped(self, index: int, answer: TeacherAnswer) -> Awaitable[None] | None:
        """`answered` from a worker of an event loop: the answer is queued for this turn's
        commit and passed on once that commit is done. The worker awaits what this returns
        before it sends anything else. Call `flush` on the loop when the workers stop."""
        if not is_recordable(answer):
            self.on_recorded(index, answer, time.time())
            return None
        if self.commits is None:
            self.commits = GroupCommit(self.ledger, asyncio.get_running_loop(), on_failure=self.on_failure)
        created_at, committed = self.commits.add(self.keys[index], answer)

        async def then() -> None:
            await committed
            self.on_recorded(index, answer, created_at)

        return then()

    def flush(self) -> None:
        """Commit the answers still queued (of workers cancelled while they waited)."""
        if self.commits is not None:
            self.commits.flush()

    def already_recorded(self, index: int, answer: TeacherAnswer, created_at: float) -> None:
        """Request `index`'s answer, recorded by another process's `Recording`: passed on."""
        self.on_recorded(index, answer, created_at)


def teacher_params_for_key(config: TeacherConfig) -> dict[str, Any]:
    """What goes into the ledger key besides the messages and the model name."""
    generation = config.generation.model_dump()
    return {"backend": config.backend, **generation}


def answer_requests(
    teacher: Teacher,
    ledger: Ledger,
    messages_list: Sequence[Messages],
    progress: Callable[[int], None] | None = None,
    budget: FailureBudget | None = None,
) -> list[tuple[TeacherAnswer, float]]:
    """Answer every request, paying only for those the ledger does not hold.

    Returns (answer, created_at) in input order; identical requests are sent once.
    `budget` counts failed answers as they arrive and stops the run past its limit.
    """
    params = teacher_params_for_key(teacher.config)
    keys = [request_key(messages, teacher.model, params) for messages in messages_list]
    found = ledger.get_many(set(keys))
    stats: TeacherStats = teacher.stats
    stats.ledger_hits += sum(1 for key in keys if key in found)

    pending: dict[str, Messages] = {}
    for key, messages in zip(keys, messages_list):
        if key not in found and key not in pending:
            pending[key] = messages
    pending_keys = list(pending)
    fresh: dict[str, tuple[TeacherAnswer, float]] = {}
    if progress is not None:
        progress(len(messages_list) - len(pending_keys))

    def recorded(index: int, answer: TeacherAnswer, created_at: float) -> None:
        fresh[pending_keys[index]] = (answer, created_at)
        if progress is not None:
            progress(1)
        if budget is not None:
            budget.count(answer)

    if pending_keys:
        answer_and_record(teacher, [pending[key] for key in pending_keys], pending_keys, ledger, recorded)
    return [found[key] if key in found else fresh[key] for key in keys]


def answer_and_record(
    teacher: Teacher,
    messages_list: Sequence[Messages],
    keys: Sequence[str],
    ledger: Ledger,
    on_recorded: Callable[[int, TeacherAnswer, float], None],
) -> None:
    """Ask `teacher` for every request; each recordable answer goes into `ledger` under its
    key the moment it arrives, then `on_recorded(index, answer, created_at)`. A failed
    ledger commit aborts the teacher's run with the commit's error."""
    teacher.answer(messages_list, Recording(ledger, keys, on_recorded, on_failure=teacher.abort))

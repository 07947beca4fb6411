"""Several teacher replicas (servers of the same model) behind one client.

`teacher.base_url` + `teacher.replicas` name the servers. `ReplicaTeacher` keeps one
`OpenAITeacher` per replica (its own connection pool, `max_concurrency` requests in flight,
first-contact gate and retries) and splits every call round-robin over the replicas in
rotation, each part answered concurrently.

A replica is taken out of rotation, with a warning, when it fails first contact
(`TeacherUnreachableError`: nothing listens, 5xx to everything, ...) or when
`DEAD_AFTER_FAILURES` prompts in a row fail on it after its retries. The prompts it did
not answer go to the replicas still in rotation; a prompt that failed on one replica is
asked on another before it counts as failed (`teacher.max_error_rate`). The run stops
only when every replica is out. Answers are recorded in the ledger as they arrive, as
with one server, so a replica that dies costs nothing already paid for.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence

from distillflow.config import TeacherConfig
from distillflow.records import TeacherAnswer, is_failure
from distillflow.tasks.teacher.budget import SpendingBudget
from distillflow.tasks.teacher.errors import TeacherAborted, TeacherFatalError, TeacherUnreachableError
from distillflow.tasks.teacher.openai_client import OpenAITeacher
from distillflow.tasks.teacher.protocol import Messages, Teacher, TeacherStats
from distillflow.tasks.teacher.recording import Recording

DEAD_AFTER_FAILURES = 5  # prompts in a row that failed on a replica after its retries


class ReplicaDead(TeacherAborted):
    """A replica was taken out of rotation (raised inside its own calls only)."""


class ReplicaTeacher:
    """The `Teacher` over the replicas of `config` (base_url first, then `replicas`)."""

    concurrent = True

    def __init__(
        self,
        config: TeacherConfig,
        api_key: str | None = None,
        one: Callable[[TeacherConfig], Teacher] | None = None,
    ) -> None:
        """`one(config)`: the client of one replica (default: an `OpenAITeacher` in this
        process, all of them spending one shared budget)."""
        self.config = config
        self.urls = [str(config.base_url), *config.replicas]
        self.budget = SpendingBudget(config)
        if one is None:

            def one(replica_config: TeacherConfig) -> Teacher:
                return OpenAITeacher(replica_config, api_key=api_key, budget=self.budget)

        self.replicas = [one(config.model_copy(update={"base_url": url, "replicas": []})) for url in self.urls]
        self.stats = TeacherStats()  # ledger hits counted by `answer_requests`; replicas' counts added at close
        self.dead: dict[int, str] = {}  # replica -> why it left the rotation
        self.lock = threading.Lock()
        self._failures_in_a_row = [0] * len(self.replicas)
        self._fatal: BaseException | None = None

    @property
    def model(self) -> str:
        return self.config.model

    def live(self) -> list[int]:
        with self.lock:
            return [index for index in range(len(self.replicas)) if index not in self.dead]

    def _take_out(self, replica: int, why: str) -> None:
        with self.lock:
            if replica in self.dead:
                return
            self.dead[replica] = why
            left = len(self.replicas) - len(self.dead)
        print(
            f"warning: teacher replica {self.urls[replica]} taken out of rotation ({why}); "
            f"{left} of {len(self.replicas)} replicas left",
            file=sys.stderr,
            flush=True,
        )
        self.replicas[replica].abort(ReplicaDead(f"replica {self.urls[replica]} taken out of rotation: {why}"))

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        """Answer every request on the replicas in rotation; each request's answer goes to
        `recording` once, after it is in the ledger (a failure only once no other replica
        is left to ask)."""
        pending = list(range(len(messages_list)))
        tries = [0] * len(messages_list)
        while pending:
            live = self.live()
            if not live:
                raise TeacherUnreachableError(self._all_dead_message())
            held_back: list[int] = []  # failed on one replica: ask another
            unanswered: set[int] = set(pending)
            guard = threading.Lock()
            errors: list[BaseException] = []

            def run(
                replica: int, part: list[int], guard: threading.Lock, unanswered: set[int],
                held_back: list[int], errors: list[BaseException],
            ) -> None:
                def recorded(position: int, answer: TeacherAnswer, created_at: float) -> None:
                    index = part[position]
                    with guard:
                        unanswered.discard(index)
                        tries[index] += 1
                    if is_failure(answer):
                        with self.lock:
                            self._failures_in_a_row[replica] += 1
                            failed_in_a_row = self._failures_in_a_row[replica]
                        if failed_in_a_row >= DEAD_AFTER_FAILURES:
                            self._take_out(replica, f"{failed_in_a_row} prompts in a row failed: {answer.error}")
                        if tries[index] < len(self.replicas) and len(self.live()) > 0:
                            with guard:
                                held_back.append(index)
                            return
                    else:
                        with self.lock:
                            self._failures_in_a_row[replica] = 0
                    recording.already_recorded(index, answer, created_at)

                try:
                    self.replicas[replica].answer(
                        [messages_list[i] for i in part],
                        recording.part(part, recorded, on_failure=self.replicas[replica].abort),
                    )
                except TeacherUnreachableError as error:  # first contact failed: this replica is down
                    self._take_out(replica, str(error).split(". Likely fix")[0])
                except ReplicaDead:
                    pass
                except BaseException as error:  # noqa: BLE001 - the run's own stop (budget, abort, signal)
                    errors.append(error)
                    self.abort(error if isinstance(error, TeacherFatalError) else TeacherAborted(repr(error)))

            parts = {replica: pending[share :: len(live)] for share, replica in enumerate(live)}
            threads = [
                threading.Thread(
                    target=run,
                    args=(replica, part, guard, unanswered, held_back, errors),
                    name=f"teacher-replica-{replica}",
                    daemon=True,
                )
                for replica, part in parts.items()
                if part
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            if self._fatal is not None:
                raise self._fatal
            pending = sorted(unanswered | set(held_back))

    def _all_dead_message(self) -> str:
        reasons = "; ".join(f"{self.urls[index]}: {why}" for index, why in sorted(self.dead.items()))
        return (
            f"all {len(self.replicas)} teacher replicas (model {self.config.model!r}) are out of rotation: "
            f"{reasons}. Likely fix: start the teacher servers or correct teacher.base_url/teacher.replicas. "
            "Answers received so far are in the ledger; rerun once a replica answers."
        )

    def abort(self, error: TeacherFatalError) -> None:
        """Stop every replica's requests (see `OpenAITeacher.abort`)."""
        if self._fatal is None:
            self._fatal = error
        for replica in self.replicas:
            replica.abort(error)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
            self.stats.add(replica.stats.to_dict())

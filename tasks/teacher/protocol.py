"""What every teacher transport implements (`Teacher`), the request format, and the counts
a run keeps.

A transport only asks for answers and hands each to the `Recording` it is given
(tasks/teacher/recording.py), which puts it in the ledger; `make_teacher`
(tasks/teacher/choose.py) picks the transport a config asks for.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from distillflow.config import ConfigError, TeacherConfig
from distillflow.tasks.teacher.budget import SpendingBudget
from distillflow.tasks.teacher.errors import TeacherFatalError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from distillflow.tasks.teacher.recording import Recording

Messages = list[dict[str, Any]]


def resolve_api_key(api_key_env: str | None) -> str:
    """The key named by `teacher.api_key_env`; never logged, never stored.

    `api_key_env: null` means the server needs no key (a local vLLM): a placeholder is sent.
    `prefect-secret:NAME` reads a Prefect Secret block.
    """
    if api_key_env is None:
        return "EMPTY"
    if api_key_env.startswith("prefect-secret:"):
        block_name = api_key_env.split(":", 1)[1]
        from prefect.blocks.system import Secret

        try:
            return Secret.load(block_name).get()
        except ValueError as error:
            raise ConfigError(
                f"teacher.api_key_env: Prefect Secret block {block_name!r} not found; "
                f"create it in the UI or with `Secret(value=...).save({block_name!r})`"
            ) from error
    value = os.environ.get(api_key_env)
    if not value:
        raise ConfigError(
            f"teacher.api_key_env: environment variable {api_key_env} is not set; "
            f"export {api_key_env}=<your key> (or set api_key_env: null for a server without auth)"
        )
    return value



def build_messages(prompt: str, system_prompt: str | None) -> Messages:
    messages: Messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


@dataclass
class TeacherStats:
    requests_sent: int = 0
    retries: int = 0
    ledger_hits: int = 0
    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = field(default_factory=Counter)

    COUNTERS = ("requests_sent", "retries", "ledger_hits", "answered", "prompt_tokens", "completion_tokens")

    def add(self, other: dict[str, Any]) -> None:
        """Add another process's `to_dict()`."""
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + other.get(name, 0))
        self.retry_reasons.update(other.get("retry_reasons", {}))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COUNTERS} | {"retry_reasons": dict(self.retry_reasons)}



def estimate_tokens(messages: Messages) -> int:
    """Prompt tokens of a chat request, about 4 characters a token plus a few per message."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages) + 3


class Teacher(Protocol):
    """What every teacher transport implements, and all the pipeline asks of one:

    - `OpenAITeacher` (openai_client.py): an OpenAI-compatible server from this process;
    - `PooledTeacher` (pool.py): the same from `client_processes` processes;
    - `ReplicaTeacher` (replicas.py): several servers of one model;
    - `BatchTeacher` (batch.py): the OpenAI Batch API;
    - `LocalTeacherClient` (local.py): a Hugging Face model in this process.

    `make_teacher` (choose.py) picks the one a config asks for. A transport only returns
    answers: the ledger, the failure budget and the ledger hits are `answer_requests`'s
    (recording.py), around any of them.
    """

    config: TeacherConfig
    stats: TeacherStats
    budget: SpendingBudget | None  # the run's spending budget, when the teacher is paid per token
    concurrent: bool  # True: several batches may be asked at once (they share the client's limits)

    @property
    def model(self) -> str: ...

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        """Ask for every request; hand each answer to `recording` as it arrives."""

    def abort(self, error: TeacherFatalError) -> None:
        """Stop every request of this run, from any thread; later calls raise `error`."""

    def close(self) -> None:
        """Release connections, threads and processes; counts end up in `stats`."""

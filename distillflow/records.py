"""The record types that flow through the whole pipeline.

A prompt is generated once (`PromptRecord`), answered by the teacher (`TeacherAnswer`),
and ends in exactly one of the accepted rows (`data/`) or the rejects (`rejects/`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from distillflow.training.chat_template import cut_at_stop


def content_id(text: str) -> str:
    """Stable id of a prompt: the first 32 hex digits of sha256 over its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PromptRecord:
    """One prompt to send to the teacher.

    `strategy` says how it was made (`seed`, `edge_case:unicode`, `adversarial:typo`, ...);
    `parent_id` is the id of the seed or prompt it was derived from (None for seeds).
    """

    id: str
    prompt: str
    strategy: str
    parent_id: str | None = None

    @classmethod
    def make(cls, prompt: str, strategy: str, parent_id: str | None = None) -> PromptRecord:
        return cls(id=content_id(prompt), prompt=prompt, strategy=strategy, parent_id=parent_id)


@dataclass(slots=True)
class TeacherAnswer:
    """What came back for one request. `error` is a reject reason code when it failed.

    `top_logprobs`: one entry per generated token,
    `{"token": str, "logprob": float, "top": [{"token": str, "logprob": float}, ...]}`.
    """

    content: str | None
    finish_reason: str | None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, Any]] | None = None
    error: str | None = None
    error_detail: str | None = None
    from_ledger: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def stopped_answer(answer: TeacherAnswer, stops: Sequence[str]) -> TeacherAnswer:
    """`answer` cut before its first stop string, with finish_reason `stop`.

    A teacher that honours `stop` never sends one; an answer recorded before a stop was
    declared (or from a server that ignores `stop`) is cut here, so it is kept rather than
    asked again. Its top_logprobs are left as they came (one entry per generated token)."""
    if not stops or not answer.ok or answer.content is None:
        return answer
    content, stopped = cut_at_stop(answer.content, stops)
    return replace(answer, content=content, finish_reason="stop") if stopped else answer


# Reasons that will not change on a retry with the same request: recorded in the ledger
# so that a rerun does not pay for them again.
PERMANENT_ERROR_PREFIXES = ("teacher_error:400", "teacher_error:413", "teacher_error:422")

# The reject reason of a prompt not sent because the run's budget would have been passed;
# never recorded in the ledger, so a rerun with a larger budget asks it.
BUDGET_REASON = "not_asked:budget"


def is_recordable(answer: TeacherAnswer) -> bool:
    """Answers worth keeping in the ledger: real answers and permanent per-prompt errors."""
    return answer.ok or (answer.error or "").startswith(PERMANENT_ERROR_PREFIXES)


def is_failure(answer: TeacherAnswer) -> bool:
    """An answer the teacher failed to give (transport, timeout, 429, 5xx, malformed), as
    opposed to an answer or a refusal of this one prompt by the API (400/413/422)."""
    return is_failure_reason(answer.error)


def is_failure_reason(reason: str | None) -> bool:
    """`is_failure` of an answer whose `error` is `reason` (None: an answer): what a teacher
    reject's reason counts as, once only the reason is left."""
    return reason is not None and not reason.startswith(PERMANENT_ERROR_PREFIXES) and reason != BUDGET_REASON


@dataclass(slots=True)
class Reject:
    """A prompt that did not make it into `data/`, with a machine-readable reason code.

    `duplicate_of` is the id of the kept row for duplicate reasons; `response` keeps a
    teacher answer that was paid for but filtered out.
    """

    id: str
    prompt: str
    strategy: str
    reason: str
    detail: str = ""
    parent_id: str | None = None
    duplicate_of: str | None = None
    response: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, record: PromptRecord, reason: str, detail: str = "", **kw: Any) -> Reject:
        return cls(
            id=record.id,
            prompt=record.prompt,
            strategy=record.strategy,
            parent_id=record.parent_id,
            reason=reason,
            detail=detail,
            **kw,
        )

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "strategy": self.strategy,
            "parent_id": self.parent_id,
            "reason": self.reason,
            "detail": self.detail,
            "duplicate_of": self.duplicate_of,
            "response": self.response,
        }

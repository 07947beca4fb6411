"""The two budgets of a teacher run: what it may spend (`SpendingBudget`, consulted by a
transport before each request it sends) and how many prompts may fail (`FailureBudget`,
counted as answers arrive, around any transport)."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distillflow.config import TeacherConfig
from distillflow.records import BUDGET_REASON, TeacherAnswer, is_failure
from distillflow.tasks.teacher.errors import (
    TeacherFailureRateError,
    TeacherFatalError,
    TeacherUnreachableError,
    likely_fix,
)


@dataclass
class Reservation:
    tokens: int
    cost_usd: float


class SpendingBudget:
    """`teacher.max_budget_usd` and `teacher.max_total_tokens` of one run, consulted before
    every request (shared by the workers, batches and threads of one teacher client).

    Before a request goes out, its worst case (prompt + `max_tokens`) is reserved; when
    spent + reserved + that would pass a limit, the request is not sent and the budget is
    `exhausted` for good: every later request is refused too, so the run stops cleanly
    while the requests in flight finish and are recorded. An answer settles its
    reservation at its real usage. With `client_processes: P`, each process holds 1/P."""

    def __init__(self, config: TeacherConfig, share: float = 1.0) -> None:
        self.pricing = config.pricing
        self.batch = config.mode == "batch"
        self.limit_usd = config.max_budget_usd * share if config.max_budget_usd else None
        self.limit_tokens = int(config.max_total_tokens * share) if config.max_total_tokens else None
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self.reserved_usd = 0.0
        self.reserved_tokens = 0
        self.refused = 0  # requests not sent
        self.exhausted = False
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.limit_usd is not None or self.limit_tokens is not None

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return self.pricing.cost_usd(input_tokens, output_tokens, self.batch) if self.pricing else 0.0

    def reserve(self, input_tokens: int, max_output_tokens: int, force: bool = False) -> Reservation | None:
        """Room for one request, or None (and `exhausted`) when it would pass a limit.
        `force`: a request already sent (a batch resumed after a crash) is counted anyway."""
        tokens = input_tokens + max_output_tokens
        cost = self.cost(input_tokens, max_output_tokens)
        with self.lock:
            if not self.exhausted and not force:
                over_usd = self.limit_usd is not None and self.spent_usd + self.reserved_usd + cost > self.limit_usd
                over_tokens = (
                    self.limit_tokens is not None and self.spent_tokens + self.reserved_tokens + tokens > self.limit_tokens
                )
                self.exhausted = over_usd or over_tokens
            if self.exhausted and not force:
                self.refused += 1
                return None
            self.reserved_usd += cost
            self.reserved_tokens += tokens
        return Reservation(tokens, cost)

    def settle(self, reservation: Reservation | None, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Replace a reservation by what the request really used (0, 0: it was not paid)."""
        with self.lock:
            if reservation is not None:
                self.reserved_usd -= reservation.cost_usd
                self.reserved_tokens -= reservation.tokens
            self.spent_usd += self.cost(input_tokens, output_tokens)
            self.spent_tokens += input_tokens + output_tokens

    def summary(self) -> dict[str, Any]:
        """For the manifest."""
        return {
            "max_budget_usd": self.limit_usd,
            "max_total_tokens": self.limit_tokens,
            "spent_usd": round(self.spent_usd, 6),
            "spent_tokens": self.spent_tokens,
            "exhausted": self.exhausted,
            "not_asked": self.refused,
        }

    def refusal(self, model: str) -> TeacherAnswer:
        limits = []
        if self.limit_usd is not None:
            limits.append(f"teacher.max_budget_usd={self.limit_usd:g} (spent {self.spent_usd:.4f})")
        if self.limit_tokens is not None:
            limits.append(f"teacher.max_total_tokens={self.limit_tokens} (used {self.spent_tokens})")
        return TeacherAnswer(
            None, None, model, error=BUDGET_REASON,
            error_detail=f"not sent: it could pass {' and '.join(limits)}; rerun with a larger limit to ask it",
        )


class FailureBudget:
    """Stops a run as soon as more than `max_error_rate` of its `total` prompts have failed
    (`is_failure`): from then on the rate can only end above it. `on_exceeded(error)` runs
    once first (e.g. `OpenAITeacher.abort`), then `count` raises `TeacherFailureRateError`
    (`TeacherUnreachableError` when no prompt has been answered yet)."""

    def __init__(
        self, total: int, config: TeacherConfig, on_exceeded: Callable[[TeacherFatalError], None] | None = None
    ) -> None:
        self.total = total
        self.config = config
        self.allowed = math.floor(config.max_error_rate * total + 1e-9)
        self.on_exceeded = on_exceeded
        self.reasons: Counter = Counter()
        self.answered = 0  # answers (and per-prompt API refusals) counted so far
        self.last_detail = ""
        self.error: TeacherFatalError | None = None
        self.lock = threading.Lock()

    @property
    def failed(self) -> int:
        return sum(self.reasons.values())

    def count(self, answer: TeacherAnswer) -> None:
        if answer.error == BUDGET_REASON:  # not sent: neither an answer nor a failure
            return
        with self.lock:
            if not is_failure(answer):
                self.answered += 1
                return
            self.reasons[answer.error or "teacher_error:unknown"] += 1
            self.last_detail = answer.error_detail or ""
            first_time = self.error is None and self.failed > self.allowed
            if first_time:
                kind = TeacherFailureRateError if self.answered else TeacherUnreachableError
                self.error = kind(self.message())
            error = self.error
        if error is None:
            return
        if first_time and self.on_exceeded is not None:
            self.on_exceeded(error)
        raise error

    def message(self) -> str:
        reason, _ = self.reasons.most_common(1)[0]
        reasons = ", ".join(f"{name} x{count}" for name, count in self.reasons.most_common())
        if not self.answered:  # not one answer yet: the teacher is down, not flaky
            return (
                f"teacher at {self.config.base_url} (model {self.config.model!r}) answered none of the "
                f"{self.failed} prompts asked so far ({reasons}); last error: {self.last_detail.rstrip('.')}. "
                f"Likely fix: {likely_fix(reason, self.config)}. Stopped the run; rerun once the teacher answers."
            )
        return (
            f"teacher at {self.config.base_url} failed {self.failed} of {self.total} prompts, more than "
            f"teacher.max_error_rate={self.config.max_error_rate:g} allows ({self.allowed}): {reasons}; "
            f"last error: {self.last_detail.rstrip('.')}. Likely fix: {likely_fix(reason, self.config)}. "
            "Answers received so far are in the ledger: rerun once the teacher is healthy and only the rest "
            "is paid for (or raise teacher.max_error_rate to accept a partial dataset)."
        )

    def summary(self) -> dict[str, Any]:
        """For the manifest: how many prompts failed, of how many, and why."""
        return {
            "failed": self.failed,
            "of": self.total,
            "rate": round(self.failed / self.total, 6) if self.total else 0.0,
            "max_error_rate": self.config.max_error_rate,
            "reasons": dict(self.reasons.most_common()),
        }

"""Teacher clients: any OpenAI-compatible server through `openai.AsyncOpenAI`.

Everything that can go wrong at the network boundary is handled here:
- bounded concurrency (`max_concurrency` workers) and an in-process token bucket for
  requests/tokens per minute;
- retries with exponential backoff and full jitter on 429 (honouring `Retry-After`),
  5xx, 408, timeouts, dropped connections and malformed bodies;
- no retry storm on permanent errors: until the endpoint has answered once (or refused
  one prompt with a 4xx, or said 429), only one request per `answer_all` call is in
  flight, and 401/403/404 stop the run at once (`TeacherFatalError`); a 400/422 for one
  prompt becomes that prompt's reject reason `teacher_error:400`;
- first contact: until the endpoint has answered once, its first prompt retries for at
  most `first_contact_s` and a second prompt gets one try; when both fail (or the first
  times out) the run stops with `TeacherUnreachableError`, naming the URL, the last error
  and the likely fix, instead of grinding through every prompt;
- `FailureBudget` stops a run once more prompts have failed than `max_error_rate` allows;
  `abort` cancels every request of a run from any thread (a signal, a failed batch).

`answer_requests` puts the ledger in front: answers already paid for come from it, and
each new answer is recorded the moment it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2
import openai

from distillflow.config import ConfigError, TeacherConfig
from distillflow.records import (  # noqa: F401 - BUDGET_REASON and is_failure: re-exported
    BUDGET_REASON,
    PERMANENT_ERROR_PREFIXES,
    TeacherAnswer,
    is_failure,
    is_recordable,
)
from distillflow.storage.ledger import Ledger, request_key

Messages = list[dict[str, Any]]

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
MAX_RETRY_AFTER_S = 120.0



class TeacherFatalError(RuntimeError):
    """The endpoint refuses every request (bad key, no permission, unknown model/URL)."""


class TeacherUnreachableError(TeacherFatalError):
    """The teacher answered none of the first prompts (connection, timeout, 5xx, malformed)."""


class TeacherFailureRateError(TeacherFatalError):
    """More prompts failed than `teacher.max_error_rate` allows."""


class NoUsableAnswersError(TeacherFatalError):
    """The run asked the teacher and got no answer that made it into the dataset."""


class TeacherAborted(TeacherFatalError):
    """The run was stopped from outside (a signal, another batch's failure)."""


# While an endpoint has not answered yet: prompts that may fail before the run stops.
FIRST_CONTACT_PROMPTS = 2


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

    def add(self, other: dict[str, Any]) -> None:
        """Add another process's `to_dict()`."""
        for name in ("requests_sent", "retries", "ledger_hits", "answered", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + other.get(name, 0))
        self.retry_reasons.update(other.get("retry_reasons", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests_sent": self.requests_sent,
            "retries": self.retries,
            "ledger_hits": self.ledger_hits,
            "answered": self.answered,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "retry_reasons": dict(self.retry_reasons),
        }


def estimate_tokens(messages: Messages) -> int:
    """Prompt tokens of a chat request, about 4 characters a token plus a few per message."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages) + 3


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


class Teacher(Protocol):
    """What every teacher implements, and all the pipeline asks of one:

    - `OpenAITeacher` (this module): an OpenAI-compatible server from this process;
    - `tasks.teacher_pool.PooledTeacher`: the same from `client_processes` processes;
    - `tasks.teacher_replicas.ReplicaTeacher`: several servers of one model;
    - `tasks.teacher_local.LocalTeacherClient`: a Hugging Face model in this process.

    `tasks.teachers.make_teacher` picks the one a config asks for.
    """

    config: TeacherConfig
    stats: TeacherStats
    budget: SpendingBudget | None  # the run's spending budget, when the teacher is paid per token
    concurrent: bool  # True: several batches may be asked at once (they share the client's limits)

    @property
    def model(self) -> str: ...

    def answer_and_record(
        self,
        messages_list: Sequence[Messages],
        keys: Sequence[str],
        ledger: Ledger,
        on_recorded: Callable[[int, TeacherAnswer, float], None],
    ) -> None:
        """Answer every request; record each recordable answer in `ledger` under its key the
        moment it arrives, then call `on_recorded(index, answer, created_at)`."""

    def abort(self, error: TeacherFatalError) -> None:
        """Stop every request of this run, from any thread; later calls raise `error`."""

    def close(self) -> None:
        """Release connections, threads and processes; counts end up in `stats`."""


def parse_duration_s(value: str | None) -> float | None:
    """OpenAI's reset durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) or plain seconds, in seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total, matched = 0.0, 0
    for number, unit in _DURATION.findall(value):
        total += float(number) * _DURATION_UNITS[unit]
        matched += len(number) + len(unit)
    return total if matched == len(value) and matched else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread; `run` submits a coroutine to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="teacher-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RateLimiter:
    """Token buckets for requests and tokens per minute, shared by the workers of a loop.

    `adaptive`: also a mirror of the API's own buckets, synced from the rate-limit headers
    of every response (`observe`): x-ratelimit-remaining-{requests,tokens} less the
    requests in flight is what may still be sent, refilled at the rate implied by
    x-ratelimit-limit-* and x-ratelimit-reset-*. A worker whose request would empty a
    mirrored bucket waits for it to refill, so every worker slows down before the API
    starts refusing; a 429's Retry-After (`hold`) pauses every worker. With
    `client_processes: P` each process mirrors the same headers but counts `share` = 1/P
    of what remains as its own."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        burst_s: float = 1.0,
        adaptive: bool = False,
        share: float = 1.0,
    ) -> None:
        # Per-second refill rates; a bucket holds `burst_s` seconds of budget (at least one
        # request), so the limit is smooth rather than a minute-sized burst.
        self.limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.capacity = {
            name: max(limit / 60.0 * burst_s, 1.0) if limit else 0.0 for name, limit in self.limits.items()
        }
        self.levels = dict(self.capacity)
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()
        self.adaptive = adaptive
        self.share = share
        self.in_flight = {"requests": 0.0, "tokens": 0.0}  # acquired, not yet answered
        # name -> (level at `at`, refill per second or None, `at`, seconds until full at `at`)
        self.mirror: dict[str, tuple[float, float | None, float, float]] = {}
        self.hold_until = 0.0
        self.waits = 0  # times a worker waited for the mirrored API limits or a Retry-After

    @property
    def active(self) -> bool:
        return self.adaptive or any(self.limits.values())

    async def acquire(self, tokens: int) -> None:
        if not self.active:
            return
        if not self.mirror and not self.hold_until and not any(self.limits.values()):
            # Adaptive, and the API has sent no rate-limit header nor Retry-After yet:
            # nothing to wait for, only the requests in flight to count.
            self.in_flight["requests"] += 1
            self.in_flight["tokens"] += tokens
            return
        need = {"requests": 1.0, "tokens": float(tokens)}
        async with self.lock:
            waited = False
            while True:
                now = time.monotonic()
                elapsed, self.updated = now - self.updated, now
                wait = 0.0
                for name, limit in self.limits.items():
                    if not limit:
                        continue
                    capacity = self.capacity[name]
                    self.levels[name] = min(capacity, self.levels[name] + elapsed * limit / 60.0)
                    # A request larger than the whole bucket waits for a full bucket.
                    want = min(need[name], capacity)
                    if self.levels[name] < want:
                        wait = max(wait, (want - self.levels[name]) * 60.0 / limit)
                api_wait = self._api_wait(need, now)
                if api_wait > 0 and not waited:
                    self.waits += 1
                    waited = True
                wait = max(wait, api_wait)
                if wait <= 0:
                    for name, limit in self.limits.items():
                        if limit:
                            self.levels[name] -= min(need[name], self.capacity[name])
                    for name, (level, rate, at, full_in) in self.mirror.items():
                        self.mirror[name] = (level - need[name], rate, at, full_in)
                    self.in_flight["requests"] += 1
                    self.in_flight["tokens"] += need["tokens"]
                    return
                await asyncio.sleep(min(wait, MAX_RETRY_AFTER_S))

    def _api_wait(self, need: dict[str, float], now: float) -> float:
        """Seconds until the mirrored API buckets (and any Retry-After) allow `need`."""
        wait = max(0.0, self.hold_until - now)
        for name, (level, rate, at, full_in) in self.mirror.items():
            if rate:
                level = level + (now - at) * rate
                if level < need[name]:
                    wait = max(wait, (need[name] - level) / rate)
            elif level < need[name]:  # refill rate unknown: wait until the API says it is full
                wait = max(wait, at + full_in - now)
        return wait

    def release(self, tokens: int) -> None:
        """A request of `tokens` acquired here has its answer (or failed)."""
        if self.active:
            self.in_flight["requests"] = max(0.0, self.in_flight["requests"] - 1)
            self.in_flight["tokens"] = max(0.0, self.in_flight["tokens"] - tokens)

    def observe(self, headers: Any) -> None:
        """Sync the mirrored buckets with a response's x-ratelimit-* headers."""
        if not self.adaptive or not _has_rate_limit_headers(headers):
            return
        now = time.monotonic()
        for name in ("requests", "tokens"):
            remaining = _header_float(headers, f"x-ratelimit-remaining-{name}")
            if remaining is None:
                continue
            limit = _header_float(headers, f"x-ratelimit-limit-{name}")
            full_in = parse_duration_s(headers.get(f"x-ratelimit-reset-{name}")) or 0.0
            previous_rate = self.mirror[name][1] if name in self.mirror else None
            rate = previous_rate
            if limit is not None and full_in > 0 and limit > remaining:
                rate = (limit - remaining) / full_in * self.share
            # What this process may still send: its share of what remains, less the
            # requests (or their tokens) already on their way (conservatively, as if none
            # had been counted by the API yet).
            self.mirror[name] = (remaining * self.share - self.in_flight[name], rate, now, full_in)

    def hold(self, seconds: float) -> None:
        """The API said Retry-After: every worker pauses that long."""
        if self.adaptive:
            self.hold_until = max(self.hold_until, time.monotonic() + min(seconds, MAX_RETRY_AFTER_S))


def _has_rate_limit_headers(headers: Any) -> bool:
    """One pass over the raw headers (an httpx lookup by name scans them all each time)."""
    raw = getattr(headers, "raw", None)
    if raw is None:
        return True  # a plain mapping: let the lookups decide
    return any(key[:12].lower() == b"x-ratelimit-" for key, _ in raw)


def _header_float(headers: Any, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


# Endpoints (base_url, model) that have answered at least once without an auth error in
# this process: only for those does a run start at full concurrency.
_verified_endpoints: set[tuple[str, str]] = set()
_verified_lock = threading.Lock()


def _retry_after_seconds(error: openai.APIStatusError) -> float | None:
    headers = error.response.headers
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            return min(float(value) / divisor, MAX_RETRY_AFTER_S)
        except ValueError:
            continue
    return None


class OpenAITeacher:
    """Chat completions against an OpenAI-compatible endpoint."""

    concurrent = True

    def __init__(
        self,
        config: TeacherConfig,
        api_key: str | None = None,
        share: float = 1.0,
        budget: SpendingBudget | None = None,
    ) -> None:
        """`share`: this client's part of the run's limits (1/P in each of P client processes);
        `budget`: a spending budget shared with other clients of the run (replicas)."""
        self.config = config
        self._api_key = api_key if api_key is not None else resolve_api_key(config.api_key_env)
        self.stats = TeacherStats()
        self.endpoint = (str(config.base_url), config.model)
        # This client's part of the run's limits (1/P in each of P client processes).
        self.share = share
        self.budget = budget if budget is not None else SpendingBudget(config, share)
        # Shared by every batch of a run (see `answer_sync`): one event loop in a thread,
        # one client and connection pool, one concurrency limit, one rate limiter.
        self._loop: BackgroundLoop | None = None
        self._shared: tuple[openai.AsyncOpenAI, asyncio.Semaphore, RateLimiter] | None = None
        self._fatal: TeacherFatalError | None = None
        self._loop_lock = threading.Lock()
        # First contact: (reason, detail, attempts, seconds) of each prompt that failed
        # before the endpoint answered once.
        self._first_failures: list[tuple[str, str, int, float]] = []
        # Worker tasks of every `answer_all` running now, with their loops (for `abort`).
        self._running: dict[asyncio.Task, asyncio.AbstractEventLoop] = {}

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def stopped(self) -> TeacherFatalError | None:
        """The error this run was aborted with, if it was."""
        return self._fatal

    def request_params(self) -> dict[str, Any]:
        """Generation parameters sent with every request (and hashed into ledger keys)."""
        generation = self.config.generation
        params: dict[str, Any] = {
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "max_tokens": generation.max_tokens,
        }
        if generation.seed is not None:
            params["seed"] = generation.seed
        if self.config.stops:  # the template's turn end (chat_template_stop) and generation.stop
            params["stop"] = self.config.stops
        if generation.top_logprobs:
            params["logprobs"] = True
            params["top_logprobs"] = generation.top_logprobs
        return params

    def _limiter(self) -> RateLimiter:
        return RateLimiter(
            self.config.requests_per_minute,
            self.config.tokens_per_minute,
            adaptive=self.config.adaptive_rate_limit,
            share=self.share,
        )

    def _client(self) -> openai.AsyncOpenAI:
        # aiohttp under the SDK (`openai[aiohttp]`) costs about a third less CPU per
        # request than its default httpx transport; it matters when one process drives
        # hundreds of requests a second.
        http_client = openai.DefaultAioHttpClient() if self.config.http_backend == "aiohttp" else None
        return openai.AsyncOpenAI(
            base_url=self.config.base_url,
            api_key=self._api_key,
            max_retries=0,  # retries are ours: counted, jittered, fail-fast on auth errors
            timeout=self.config.timeout_s,
            http_client=http_client,
        )

    def answer_sync(
        self,
        messages_list: Sequence[Messages],
        on_answer: Callable[[int, TeacherAnswer], None] | None = None,
    ) -> list[TeacherAnswer]:
        """`answer_all` from synchronous code, on the teacher's own event loop thread.

        Several threads (concurrent batch tasks) may call this at once: they share the
        client, `max_concurrency` and the rate limits. `on_answer` runs on the loop thread
        (or, with `client_processes > 1`, on the thread receiving that process's answers).
        """
        with self._loop_lock:
            if self._loop is None:
                self._loop = BackgroundLoop()
        return self._loop.run(self.answer_shared(messages_list, on_answer))

    def answer_and_record(
        self,
        messages_list: Sequence[Messages],
        keys: Sequence[str],
        ledger: Ledger,
        on_recorded: Callable[[int, TeacherAnswer, float], None],
    ) -> None:
        """Answer every request and record each recordable answer under its key as it
        arrives; then `on_recorded(index, answer, created_at)`.

        Answers that arrive in the same turn of the event loop are committed in one
        transaction at the end of that turn, and the workers that received them wait for
        that commit before they send anything else: what a crash can lose is still at most
        the requests on the wire, at a fifth of the ledger's cost per answer."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = BackgroundLoop()
        self._loop.run(self.answer_and_record_async(messages_list, keys, ledger, on_recorded))

    async def answer_and_record_async(
        self,
        messages_list: Sequence[Messages],
        keys: Sequence[str],
        ledger: Ledger,
        on_recorded: Callable[[int, TeacherAnswer, float], None],
    ) -> None:
        """`answer_and_record` on the caller's event loop (a client process runs its own).
        A ledger commit that fails (a full disk) aborts the run at once with its error."""
        commits = GroupCommit(ledger, asyncio.get_running_loop(), on_failure=self.abort)

        def record(index: int, answer: TeacherAnswer) -> Awaitable[None] | None:
            if not is_recordable(answer):
                on_recorded(index, answer, time.time())
                return None
            created_at, committed = commits.add(keys[index], answer)

            async def then() -> None:
                await committed
                on_recorded(index, answer, created_at)

            return then()

        try:
            await self.answer_shared(messages_list, on_answer=record)
        finally:
            commits.flush()  # answers of workers cancelled while waiting for their commit

    async def answer_shared(
        self,
        messages_list: Sequence[Messages],
        on_answer: Callable[[int, TeacherAnswer], None] | None = None,
    ) -> list[TeacherAnswer]:
        """`answer_all` with the client, concurrency limit and rate limiter every call of
        this teacher shares; on the caller's event loop (a client process runs its own)."""
        client, semaphore, limiter = self.shared_parts()
        return await self.answer_all(messages_list, on_answer, client=client, semaphore=semaphore, limiter=limiter)

    def shared_parts(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore, RateLimiter]:
        """The client (its TLS context takes ~0.1 s to make), concurrency limit and rate
        limiter of `answer_shared`, made on first use, on the running event loop."""
        if self._shared is None:
            self._shared = (
                self._client(),
                asyncio.Semaphore(self.config.max_concurrency),
                self._limiter(),
            )
        return self._shared

    async def aclose(self) -> None:
        """Close the shared client (on the loop it was used on)."""
        if self._shared is not None:
            client, self._shared = self._shared[0], None
            await client.close()

    def abort(self, error: BaseException) -> None:
        """Stop every request of this run, from any thread: requests in flight are cancelled
        and every `answer_*` call raises `error` (a `TeacherFatalError`, or the ledger's
        `DiskWriteError`). Answers received so far are in the ledger
        (each is recorded as it arrives)."""
        if self._fatal is None:
            self._fatal = error
        with self._loop_lock:
            running = list(self._running.items())
        for task, loop in running:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nothing runs there
                loop.call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        """Close the shared client and stop the loop thread (after `answer_sync`)."""
        if self._loop is None:
            return
        self._loop.run(self.aclose())
        self._loop.close()
        self._loop = None

    async def answer_all(
        self,
        messages_list: Sequence[Messages],
        on_answer: Callable[[int, TeacherAnswer], Awaitable[None] | None] | None = None,
        client: openai.AsyncOpenAI | None = None,
        semaphore: asyncio.Semaphore | None = None,
        limiter: RateLimiter | None = None,
    ) -> list[TeacherAnswer]:
        """Answers in input order; `on_answer(index, answer)` runs as each arrives, and
        when it returns an awaitable the worker awaits it before its next request. Raises `TeacherFatalError` (after cancelling in-flight
        requests) when the endpoint rejects the credentials, the model or the URL, when it
        answers none of the first prompts (`TeacherUnreachableError`), or after `abort`.

        Without `client`/`semaphore`/`limiter`, this call makes its own (closed at the end)."""
        results: list[TeacherAnswer | None] = [None] * len(messages_list)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(messages_list)):
            queue.put_nowait(index)
        limiter = limiter or self._limiter()
        semaphore = semaphore or asyncio.Semaphore(self.config.max_concurrency)
        params = self.request_params()
        opened = asyncio.Event()
        with _verified_lock:
            if self.endpoint in _verified_endpoints:
                opened.set()
        if self._fatal is not None:
            raise self._fatal

        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(self._client())

            async def worker() -> None:
                while True:
                    try:
                        index = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    # The slot is held until the answer is recorded (the ledger commit that
                    # `on_answer` may return): never more than `max_concurrency` answers are
                    # paid for and not yet recorded, whatever stops the run.
                    async with semaphore:
                        answer = await self._answer_one(client, limiter, params, messages_list[index], opened)
                        results[index] = answer
                        self.stats.answered += answer.error != BUDGET_REASON
                        self.stats.prompt_tokens += answer.prompt_tokens
                        self.stats.completion_tokens += answer.completion_tokens
                        if on_answer is not None:
                            waiting = on_answer(index, answer)
                            if waiting is not None:  # e.g. the ledger commit of this answer
                                await waiting

            async def follower(first: asyncio.Task) -> None:
                # Until the endpoint has answered once, only the first worker asks; the
                # others start when it has, or when the first worker is done (for any reason).
                if not opened.is_set():
                    waiter = asyncio.ensure_future(opened.wait())
                    try:
                        await asyncio.wait({waiter, first}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                if not first.done() or (not first.cancelled() and first.exception() is None):
                    await worker()

            workers = min(self.config.max_concurrency, max(1, len(messages_list)))
            first = asyncio.create_task(worker())
            tasks = [first] + [asyncio.create_task(follower(first)) for _ in range(workers - 1)]
            loop = asyncio.get_running_loop()
            with self._loop_lock:
                self._running.update((task, loop) for task in tasks)
            try:
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                if self._fatal is None:  # cancelled by our caller, not by `abort`
                    raise
                raise self._fatal from None
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with self._loop_lock:
                    for task in tasks:
                        self._running.pop(task, None)
        return results  # type: ignore[return-value]

    def _mark_open(self, opened: asyncio.Event) -> None:
        if not opened.is_set():
            with _verified_lock:
                _verified_endpoints.add(self.endpoint)
            opened.set()

    async def _answer_one(
        self,
        client: openai.AsyncOpenAI,
        limiter: RateLimiter,
        params: dict[str, Any],
        messages: Messages,
        opened: asyncio.Event,
    ) -> TeacherAnswer:
        prompt_estimate = estimate_tokens(messages)
        estimated_tokens = prompt_estimate + params["max_tokens"]
        reason, detail = "teacher_error:unknown", ""
        # A prompt asked after another failed on first contact gets one try: it decides.
        attempts_allowed = 1 if self._first_failures and not opened.is_set() else self.config.max_retries + 1
        started = time.monotonic()
        attempts = 0
        for attempt in range(attempts_allowed):
            if self._fatal is not None:  # another batch of this run hit an auth error, or `abort`
                raise self._fatal
            reservation = None
            if self.budget.active:
                reservation = self.budget.reserve(prompt_estimate, params["max_tokens"])
                if reservation is None:  # would pass the budget: not sent (nor anything after it)
                    return self.budget.refusal(self.model)
            if attempt:
                self.stats.retries += 1
                self.stats.retry_reasons[reason] += 1
            await limiter.acquire(estimated_tokens)
            self.stats.requests_sent += 1
            attempts += 1
            retry_after: float | None = None
            used = (0, 0)  # (input, output) tokens paid for by this attempt
            try:
                # The SDK's own request path (auth, headers, timeouts, typed status errors)
                # with the raw response: the answer is read straight from the JSON bytes,
                # skipping the SDK's params transform and response model (about a third of
                # its CPU per request), and the rate-limit headers are at hand.
                response = await client.post(
                    "/chat/completions",
                    body={"model": self.config.model, "messages": messages, **params},
                    cast_to=httpx2.Response,
                )
                limiter.observe(response.headers)
                body = response.content
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
                self._fatal = TeacherFatalError(self.fatal_message(error))
                raise self._fatal from None
            except openai.RateLimitError as error:
                self._mark_open(opened)  # alive, only busy
                reason, detail = "teacher_error:429", _short(error)
                retry_after = _retry_after_seconds(error)
                limiter.observe(error.response.headers)
                if retry_after is not None:
                    limiter.hold(retry_after)
            except openai.APIStatusError as error:
                status = error.status_code
                reason, detail = f"teacher_error:{status}", _short(error)
                if status < 500 and status not in (408, 409):
                    self._mark_open(opened)  # the server read the request and refused this prompt
                    return TeacherAnswer(None, None, self.model, error=reason, error_detail=detail)
                retry_after = _retry_after_seconds(error)
            except openai.APITimeoutError as error:
                reason, detail = _timeout_reason(error), _short(error, cause=True)
            except openai.APIConnectionError as error:
                reason, detail = "teacher_error:connection", _short(error, cause=True)
            except (openai.APIResponseValidationError, ValueError) as error:
                reason, detail = "teacher_error:malformed", _short(error)
            else:
                answer = self._parse(body)
                if answer is not None:
                    self._mark_open(opened)
                    # A server that reports no usage is charged at the estimate.
                    used = (
                        answer.prompt_tokens or prompt_estimate,
                        answer.completion_tokens or len(answer.content or "") // 4,
                    )
                    return answer
                reason, detail = "teacher_error:malformed", f"unexpected response body: {body[:200]!r}"
            finally:
                limiter.release(estimated_tokens)
                if reservation is not None:
                    self.budget.settle(reservation, *used)
            if attempt + 1 >= attempts_allowed:
                break
            wait = self._backoff(attempt, retry_after)
            if not opened.is_set() and (
                reason == "teacher_error:timeout" or time.monotonic() - started + wait > self.config.first_contact_s
            ):
                break  # first contact: each timeout cost timeout_s already; retries are bounded
            await asyncio.sleep(wait)
        if not opened.is_set():
            self._first_contact_failed(reason, detail, attempts, time.monotonic() - started)
        return TeacherAnswer(
            None, None, self.model, error=reason,
            error_detail=f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}: {detail}",
        )

    def _first_contact_failed(self, reason: str, detail: str, attempts: int, seconds: float) -> None:
        """Note a prompt that failed before the endpoint answered once; stop the run when
        `FIRST_CONTACT_PROMPTS` have (or one timed out: each try costs `timeout_s`)."""
        if _endpoint_verified(self.endpoint):  # another batch got an answer meanwhile
            return
        self._first_failures.append((reason, detail, attempts, seconds))
        if len(self._first_failures) < FIRST_CONTACT_PROMPTS and not reason.endswith(":timeout"):
            return
        self._fatal = TeacherUnreachableError(unreachable_message(self.config, self._first_failures))
        raise self._fatal

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.1 * max(retry_after, 1.0))
        # Exponential backoff with full jitter.
        return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))

    def fatal_message(self, error: openai.APIStatusError) -> str:
        status = error.status_code
        fixes = {
            401: f"the API key in ${self.config.api_key_env} was refused; export the right key",
            403: f"the key in ${self.config.api_key_env} has no permission for this model",
            404: f"model {self.config.model!r} or URL {self.config.base_url} not found; "
            "check teacher.model and teacher.base_url (it usually ends in /v1)",
        }
        return f"teacher endpoint {self.config.base_url} answered {status}: {fixes.get(status, '')}. Stopped the run."

    def _parse(self, body: bytes) -> TeacherAnswer | None:
        """A chat completion body → `TeacherAnswer`; None when it is not one (malformed)."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return self.parse_completion(data)

    def parse_completion(self, data: Any) -> TeacherAnswer | None:
        """A chat completion (parsed JSON) → `TeacherAnswer`; None when it is not one."""
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
            if content is not None and not isinstance(content, str):
                return None
            usage = data.get("usage") or {}
            top_logprobs = None
            logprobs = choice.get("logprobs")
            if self.config.generation.top_logprobs and logprobs and logprobs.get("content") is not None:
                top_logprobs = [
                    {
                        "token": item["token"],
                        "logprob": float(item["logprob"]),
                        "top": [
                            {"token": alt["token"], "logprob": float(alt["logprob"])}
                            for alt in (item.get("top_logprobs") or [])
                        ],
                    }
                    for item in logprobs["content"]
                ]
            return TeacherAnswer(
                content=content,
                finish_reason=choice.get("finish_reason"),
                model=data.get("model") or self.model,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                top_logprobs=top_logprobs,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None


def _endpoint_verified(endpoint: tuple[str, str]) -> bool:
    with _verified_lock:
        return endpoint in _verified_endpoints


def likely_fix(reason: str, config: TeacherConfig) -> str:
    """What to do about a teacher that fails every request with `reason`."""
    status = reason.rsplit(":", 1)[-1]
    if status == "connection":
        return (
            "nothing accepts connections there: start the teacher server, or correct teacher.base_url "
            "(scheme, host and port; it usually ends in /v1)"
        )
    if status in ("timeout", "408"):
        return (
            f"the server took the connection but sent no answer within teacher.timeout_s={config.timeout_s:g} s: "
            "check that it is healthy (its log, memory), or raise teacher.timeout_s if it is only slow"
        )
    if status == "malformed":
        return (
            "something answers at that URL, but not with OpenAI chat completions (an HTML page, a proxy, "
            "another API): point teacher.base_url at the API root, which usually ends in /v1"
        )
    if status == "429":
        return "the endpoint keeps rate-limiting: check the account's quota, or lower teacher.requests_per_minute"
    if status.isdigit():
        return (
            f"the server answers with HTTP {status}: read the teacher server's log (model still loading? "
            "out of memory?) and restart it"
        )
    return "check that the teacher server is up and that teacher.base_url points at it"


def unreachable_message(config: TeacherConfig, failures: Sequence[tuple[str, str, int, float]]) -> str:
    reason, detail, _, _ = failures[-1]
    attempts = sum(failure[2] for failure in failures)
    seconds = sum(failure[3] for failure in failures)
    prompts = "its first prompt" if len(failures) == 1 else f"any of its first {len(failures)} prompts"
    return (
        f"teacher at {config.base_url} (model {config.model!r}) did not answer {prompts} "
        f"({attempts} request{'s' if attempts > 1 else ''} over {seconds:.0f} s); last error: {reason}: "
        f"{detail.rstrip('.')}. Likely fix: {likely_fix(reason, config)}. "
        "Stopped the run before paying for anything; rerun once the teacher answers "
        f"(`curl {str(config.base_url).rstrip('/')}/models` should list the model)."
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


def _timeout_reason(error: openai.APITimeoutError) -> str:
    """`teacher_error:timeout`, or `:connection` for a dropped connection, which the SDK's
    aiohttp transport reports as a connect timeout."""
    import aiohttp

    cause, dropped = error.__cause__, False
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, TimeoutError):
            return "teacher_error:timeout"
        dropped = dropped or isinstance(cause, aiohttp.ClientConnectionError)
        cause = cause.__cause__ or cause.__context__
    return "teacher_error:connection" if dropped else "teacher_error:timeout"


def _short(error: BaseException, cause: bool = False) -> str:
    """`Type: message`, cut to 300 characters; with `cause`, that of the error's root cause
    when it has a message (the SDK says "Connection error."; its cause says which host and why)."""
    root = error
    for _ in range(10):
        if not cause or (root.__cause__ or root.__context__) is None:
            break
        root = root.__cause__ or root.__context__
    shown = root if str(root) else error
    return f"{type(shown).__name__}: {shown}"[:300]


# Young-object collections while a request loop runs (a client process, the build's teacher
# stage): every this many allocations, not Python's default 700. A request allocates a few
# hundred container objects that reference counting frees within its turn, so collecting
# them a few times per request is wasted work.
YOUNG_COLLECTION_ALLOCATIONS = 10_000


@contextlib.contextmanager
def request_loop_gc() -> Iterator[None]:
    """The cyclic garbage collector while a request loop runs (a client process's life, the
    build's teacher stage), restored afterwards: the objects alive now are frozen out of it,
    since it would walk them on every full collection the requests' garbage triggers, and
    young objects are collected every `YOUNG_COLLECTION_ALLOCATIONS` allocations. Measured
    on 20,000 requests: the collector's time falls from ~2.3 s to ~0.1 s."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], YOUNG_COLLECTION_ALLOCATIONS), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


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
        requests = [pending[key] for key in pending_keys]
        teacher.answer_and_record(requests, pending_keys, ledger, recorded)
    return [found[key] if key in found else fresh[key] for key in keys]

"""`OpenAITeacher`: any OpenAI-compatible server through `openai.AsyncOpenAI`.

Everything that can go wrong at the network boundary is handled here:
- bounded concurrency (`max_concurrency` workers) and an in-process token bucket for
  requests/tokens per minute (rate_limit.py);
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
- the spending budget (budget.py) is consulted before every request;
- `abort` cancels every request of a run from any thread (a signal, a failed batch, the
  failure budget).

Each answer goes to the `Recording` of the call (recording.py), which puts it in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx2
import openai

from distillflow.config import TeacherConfig
from distillflow.records import BUDGET_REASON, TeacherAnswer
from distillflow.tasks.teacher.budget import SpendingBudget
from distillflow.tasks.teacher.errors import TeacherFatalError, TeacherUnreachableError, unreachable_message
from distillflow.tasks.teacher.protocol import Messages, TeacherStats, estimate_tokens, resolve_api_key
from distillflow.tasks.teacher.rate_limit import MAX_RETRY_AFTER_S, RateLimiter
from distillflow.tasks.teacher.recording import Recording

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0

# While an endpoint has not answered yet: prompts that may fail before the run stops.
FIRST_CONTACT_PROMPTS = 2


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

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        """Answer every request, each handed to `recording` as it arrives.

        Answers that arrive in the same turn of the event loop are committed in one
        transaction at the end of that turn, and the workers that received them wait for
        that commit before they send anything else: what a crash can lose is still at most
        the requests on the wire, at a fifth of the ledger's cost per answer."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = BackgroundLoop()
        self._loop.run(self.answer_async(messages_list, recording))

    async def answer_async(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        """`answer` on the caller's event loop (a client process runs its own)."""
        try:
            await self.answer_shared(messages_list, on_answer=recording.answered_grouped)
        finally:
            recording.flush()  # answers of workers cancelled while waiting for their commit

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

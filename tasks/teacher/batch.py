"""`teacher.mode: batch`: the OpenAI Batch API (about half the price, answers within 24 h).

The requests are written as JSONL in chunks within the API's limits (at most
`max_requests_per_file` lines and `max_file_mb` per file), each uploaded with
`files.create(purpose="batch")` and run with `batches.create(endpoint="/v1/chat/completions",
completion_window="24h")`; the batches are polled every `poll_interval_s` until done (at
most `max_wait_s`), and their output and error files are downloaded and mapped back to the
requests by `custom_id` (the request's ledger key). Requests that failed for a reason a
retry can fix (5xx, 429, an expired or failed batch) go into new batches, at most
`max_resubmits` rounds.

Crash safety: the ledger records each uploaded file with its requests' keys *before* its
batch is created, and the batch id *before* the first poll. A rerun finds the batches
holding its requests still open in the ledger and polls them instead of creating new
ones; a file uploaded whose batch id never reached the ledger (a crash between the two
calls) is looked up by its input file id in `batches.list`. Each answer is recorded in the
ledger as it is read, so nothing is paid twice.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import openai

from distillflow.config import TeacherConfig
from distillflow.records import TeacherAnswer
from distillflow.records import PERMANENT_ERROR_PREFIXES
from distillflow.tasks.teacher.budget import Reservation
from distillflow.tasks.teacher.errors import TeacherFatalError
from distillflow.tasks.teacher.openai_client import OpenAITeacher
from distillflow.tasks.teacher.protocol import Messages, estimate_tokens
from distillflow.tasks.teacher.recording import Recording

FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


class TeacherBatchTimeout(TeacherFatalError):
    """Batches still running after `teacher.batch.max_wait_s`."""


def answer_by_batches(teacher: BatchTeacher, messages_list: Sequence[Messages], recording: Recording) -> None:
    """Answer every request through batches; each answer goes to `recording` as it is read."""
    run = BatchRun(teacher, messages_list, recording)
    try:
        run.answer()
    finally:
        run.client.close()


class BatchTeacher:
    """The `Teacher` of `teacher.mode: batch`: every `answer` call is one batch
    run (see the module docstring); prices, parsing, budget and counts are those of the
    online client it wraps."""

    concurrent = True

    def __init__(self, config: TeacherConfig, api_key: str) -> None:
        self.config = config
        self.api_key = api_key
        self.online = OpenAITeacher(config, api_key=api_key)
        self.stats = self.online.stats
        self.budget = self.online.budget

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def stopped(self) -> TeacherFatalError | None:
        return self.online.stopped

    def request_params(self) -> dict[str, Any]:
        return self.online.request_params()

    def parse_completion(self, data: Any) -> TeacherAnswer | None:  # noqa: ANN401 - a JSON body
        return self.online.parse_completion(data)

    def fatal_message(self, error: openai.APIStatusError) -> str:
        return self.online.fatal_message(error)

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        answer_by_batches(self, messages_list, recording)

    def abort(self, error: TeacherFatalError) -> None:
        self.online.abort(error)

    def close(self) -> None:
        self.online.close()


class BatchRun:
    def __init__(self, teacher: Any, messages_list: Sequence[Messages], recording: Recording) -> None:
        self.teacher = teacher
        self.config = teacher.config
        self.settings = teacher.config.batch
        self.messages = dict(zip(recording.keys, messages_list))
        self.index_of = {key: index for index, key in enumerate(recording.keys)}
        self.recording = recording
        self.ledger = recording.ledger  # the batches' own bookkeeping: uploads, batch ids
        self.delivered: set[str] = set()
        self.reservations: dict[str, Reservation | None] = {}
        self.params = teacher.request_params()
        self.workdir = self.ledger.path.parent / "batches"
        # Only idempotent calls are retried by the SDK; batches.create is retried by us,
        # after checking that the failed call did not create the batch after all.
        self.client = openai.OpenAI(
            base_url=self.config.base_url, api_key=teacher.api_key, max_retries=3, timeout=self.config.timeout_s
        )
        self.deadline = time.monotonic() + self.settings.max_wait_s

    # -- the run --------------------------------------------------------------------------

    def answer(self) -> None:
        # Batches of an earlier run (crashed, or still waiting) that hold these requests.
        active: dict[str, str] = {}  # input_file_id -> batch_id
        for input_file_id, batch in self.ledger.open_batches(self.index_of).items():
            for key in batch["keys"]:
                if key in self.index_of and key not in self.reservations:
                    # Already sent: counted against the budget whatever it says.
                    self.reservations[key] = self._reserve(key, force=True)
            batch_id = batch["batch_id"] or self._adopt_or_create(input_file_id)
            active[input_file_id] = batch_id
            self._log(f"resuming batch {batch_id} ({len(batch['keys'])} requests, last status {batch['status']})")
        fresh = [key for key in self.index_of if key not in self.reservations]
        active.update(self._submit(fresh))
        for round_number in range(self.settings.max_resubmits + 1):
            retry = self._poll(active)
            if not retry:
                return
            if round_number == self.settings.max_resubmits:
                for key, reason, detail in retry:
                    self._deliver(key, TeacherAnswer(None, None, self.config.model, error=reason, error_detail=detail))
                return
            self._log(f"{len(retry)} requests failed in their batch; sending them again in new batches")
            self.teacher.stats.retries += len(retry)
            self.teacher.stats.retry_reasons.update(reason for _, reason, _ in retry)
            active = self._submit([key for key, _, _ in retry])

    def _reserve(self, key: str, force: bool = False) -> Reservation | None:
        budget = self.teacher.budget
        if not budget.active:
            return None
        return budget.reserve(estimate_tokens(self.messages[key]), self.params["max_tokens"], force=force)

    def _submit(self, keys: list[str]) -> dict[str, str]:
        """Write, upload and create batches for `keys` (those within the budget); each
        upload and batch id is in the ledger before anything waits on it."""
        sendable: list[str] = []
        budget = self.teacher.budget
        for key in keys:
            if budget.active:
                reservation = self._reserve(key)
                if reservation is None:
                    self._deliver(key, budget.refusal(self.config.model))
                    continue
                self.reservations[key] = reservation
            else:
                self.reservations[key] = None
            sendable.append(key)
        created: dict[str, str] = {}
        for chunk_keys, lines in self._chunks(sendable):
            path = self._write_chunk(lines)
            with open(path, "rb") as handle:
                upload = (path.name, handle)
                uploaded = self._call(lambda upload=upload: self.client.files.create(file=upload, purpose="batch"))
            self.ledger.record_upload(uploaded.id, chunk_keys)
            path = path.rename(self.workdir / f"{uploaded.id}.jsonl")  # kept until its batch is collected
            created[uploaded.id] = self._create_batch(uploaded.id)
            self.teacher.stats.requests_sent += len(chunk_keys)
            self._log(f"created batch {created[uploaded.id]} ({len(chunk_keys)} requests, {path.stat().st_size} bytes)")
        return created

    def _chunks(self, keys: list[str]) -> Iterator[tuple[list[str], list[bytes]]]:
        """(keys, JSONL lines) of each file: within the request count and size limits."""
        limit_bytes = int(self.settings.max_file_mb * 1_000_000)
        chunk_keys: list[str] = []
        lines: list[bytes] = []
        size = 0
        for key in keys:
            line = json.dumps(
                {
                    "custom_id": key,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": self.config.model, "messages": self.messages[key], **self.params},
                },
                ensure_ascii=False,
            ).encode("utf-8") + b"\n"
            if chunk_keys and (len(chunk_keys) >= self.settings.max_requests_per_file or size + len(line) > limit_bytes):
                yield chunk_keys, lines
                chunk_keys, lines, size = [], [], 0
            chunk_keys.append(key)
            lines.append(line)
            size += len(line)
        if chunk_keys:
            yield chunk_keys, lines

    def _write_chunk(self, lines: list[bytes]) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"requests-{time.time_ns()}.jsonl"
        path.write_bytes(b"".join(lines))
        return path

    def _create_batch(self, input_file_id: str) -> str:
        last_error: Exception | None = None
        for attempt in range(3):
            if attempt:
                adopted = self._find_batch(input_file_id)
                if adopted is not None:
                    return adopted
                time.sleep(2.0**attempt)
            try:
                batch = self.client.with_options(max_retries=0).batches.create(
                    input_file_id=input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
                raise TeacherFatalError(self.teacher.fatal_message(error)) from None
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as error:
                last_error = error
                continue
            self.ledger.record_batch(input_file_id, batch.id, "submitted", batch.status)
            return batch.id
        raise TeacherFatalError(
            f"teacher at {self.config.base_url}: could not create a batch for file {input_file_id}: {last_error}; "
            "the upload is recorded in the ledger: rerun to try again"
        )

    def _adopt_or_create(self, input_file_id: str) -> str:
        """A file uploaded by a run that stopped before recording its batch."""
        batch_id = self._find_batch(input_file_id)
        if batch_id is None:
            return self._create_batch(input_file_id)
        self.ledger.record_batch(input_file_id, batch_id, "submitted")
        return batch_id

    def _find_batch(self, input_file_id: str) -> str | None:
        for batch in self._call(lambda: self.client.batches.list(limit=100)):
            if batch.input_file_id == input_file_id:
                return batch.id
        return None

    def _poll(self, active: dict[str, str]) -> list[tuple[str, str, str]]:
        """Wait for `active` batches; collect their answers. Returns the requests to send
        again: (key, reason, detail)."""
        retry: list[tuple[str, str, str]] = []
        while active:
            for input_file_id, batch_id in list(active.items()):
                try:
                    batch = self.client.batches.retrieve(batch_id)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                    raise TeacherFatalError(self.teacher.fatal_message(error)) from None
                except (openai.APIConnectionError, openai.APIStatusError) as error:
                    self._log(f"batch {batch_id}: status check failed ({type(error).__name__}); trying again")
                    continue
                if batch.status not in FINAL_STATUSES:
                    self.ledger.record_batch(input_file_id, None, "submitted", batch.status)
                    continue
                retry += self._collect(input_file_id, batch)
                self.ledger.record_batch(input_file_id, None, "done", batch.status)
                (self.workdir / f"{input_file_id}.jsonl").unlink(missing_ok=True)
                del active[input_file_id]
            if active:
                self._wait(active)
        return retry

    def _wait(self, active: dict[str, str]) -> None:
        """Sleep `poll_interval_s`, waking for `abort` (Ctrl-C) every 0.2 s."""
        until = time.monotonic() + self.settings.poll_interval_s
        while time.monotonic() < until:
            if self.teacher.stopped is not None:
                raise self.teacher.stopped
            if time.monotonic() > self.deadline:
                raise TeacherBatchTimeout(
                    f"batches {', '.join(active.values())} at {self.config.base_url} are not done after "
                    f"teacher.batch.max_wait_s={self.settings.max_wait_s:g} s; they are recorded in the ledger: "
                    "rerun later to collect them (nothing is sent twice), or raise max_wait_s"
                )
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def _collect(self, input_file_id: str, batch: Any) -> list[tuple[str, str, str]]:
        """Read a finished batch's output and error files into the ledger; the requests
        to send again."""
        results: dict[str, dict[str, Any]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = self._call(lambda file_id=file_id: self.client.files.content(file_id)).content
            for line in content.splitlines():
                if line.strip():
                    item = json.loads(line)
                    results[item["custom_id"]] = item
        batch_keys = self.ledger.batch_keys(input_file_id)
        retry: list[tuple[str, str, str]] = []
        for key in batch_keys:
            item = results.get(key)
            if item is None:
                retry.append((key, f"teacher_error:batch_{batch.status}", f"no result in batch {batch.id} ({batch.status})"))
                self._settle(key, None)
                continue
            response = item.get("response") or {}
            status = response.get("status_code")
            body = response.get("body")
            if status == 200:
                answer = self.teacher.parse_completion(body)
                if answer is None:
                    answer = TeacherAnswer(None, None, self.config.model, error="teacher_error:malformed",
                                           error_detail=f"unexpected response body: {json.dumps(body)[:200]}")
                self._settle(key, answer)
                self._deliver(key, answer)
                continue
            self._settle(key, None)
            reason = f"teacher_error:{status}" if status else "teacher_error:batch_item"
            message = ((body or {}).get("error") or {}).get("message") if isinstance(body, dict) else None
            detail = f"batch {batch.id}: {message or item.get('error') or 'failed'}"
            if reason.startswith(PERMANENT_ERROR_PREFIXES):
                self._deliver(key, TeacherAnswer(None, None, self.config.model, error=reason, error_detail=detail))
            else:
                retry.append((key, reason, detail))
        return [entry for entry in retry if entry[0] in self.index_of and entry[0] not in self.delivered]

    def _settle(self, key: str, answer: TeacherAnswer | None) -> None:
        stats = self.teacher.stats
        if answer is not None:
            stats.answered += 1
            stats.prompt_tokens += answer.prompt_tokens
            stats.completion_tokens += answer.completion_tokens
        reservation = self.reservations.pop(key, None)
        if reservation is not None or (answer is not None and self.teacher.budget.active):
            used = (answer.prompt_tokens, answer.completion_tokens) if answer is not None else (0, 0)
            self.teacher.budget.settle(reservation, *used)

    def _deliver(self, key: str, answer: TeacherAnswer) -> None:
        """Hand an answer of this call to the recording, once each; record the others too
        (answers of another run's requests: they are paid)."""
        if key in self.index_of and key not in self.delivered:
            self.delivered.add(key)
            self.recording.answered(self.index_of[key], answer)
        else:
            self.recording.record(key, answer)

    def _call(self, function: Callable[[], Any]) -> Any:
        try:
            return function()
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
            raise TeacherFatalError(self.teacher.fatal_message(error)) from None

    def _log(self, message: str) -> None:
        print(f"[teacher batch] {message}", file=sys.stderr, flush=True)

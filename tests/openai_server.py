"""An OpenAI-compatible chat server for tests and benchmarks, with scripted faults.

Run it as a process (`python tests/openai_server.py --port 8123 --api-key k`) or start it in
a thread with `ServerThread`. Answers are a pure function of the prompt
(`expected_answer(prompt)`), so a client can check that every response belongs to its
prompt, whatever the concurrency.

Faults are scripted per prompt by markers in the last user message; `xN` limits a fault
to the first N attempts of that prompt (without it, the fault is permanent):

    [[400]]           400 Bad Request (every attempt)
    [[429x2]]         429 with Retry-After (seconds) on the first 2 attempts
    [[500x1]]         500; [[503x2]] 503
    [[dropx1]]        close the connection without an answer
    [[badjsonx1]]     200 with a malformed JSON body
    [[hangx1]]        sleep `--hang-s` seconds (past the client's timeout)
    [[truncate]]      finish_reason "length"
    [[empty]]         empty content
    [[garbage]]       content is a fixed nonsense string (for parser tests)
    [[say:TEXT]]      content is exactly TEXT (up to the closing ]])

A wrong `Authorization: Bearer` key gets 401; an unknown model gets 404. `GET /stats`
returns request counts per prompt; `POST /reset` clears them.

`rate_limit_requests=(N, W)` (and `rate_limit_tokens`) puts the server behind a token
bucket of N per W seconds, as OpenAI's are: every answer carries `x-ratelimit-limit-*`,
`x-ratelimit-remaining-*` and `x-ratelimit-reset-*` (time until the bucket is full, in
OpenAI's `1s` / `6m0s` / `20ms` format), and a request finding the bucket empty gets a 429
with `retry-after-ms` (counted in `rate_limited`).

The Files and Batches endpoints of the Batch API are there too (`POST /v1/files`,
`GET /v1/files/{id}/content`, `POST/GET /v1/batches`, `GET /v1/batches/{id}`): a batch
answers each line of its JSONL like a chat request (the markers apply; drop, bad JSON and
hang become 500s), `batch_latency_s` after it was created; answers go to its output file,
non-200s to its error file. `batches_created` and `files_uploaded` count the calls.

With `scoring_model` (a Hugging Face model directory), `POST /v1/completions` scores token
ids as vLLM does with `extra_body={"prompt_logprobs": k}`: `prompt` is a list of token-id
lists, and each choice carries `prompt_logprobs` (entry 0 None; entry i the top-k of the
distribution predicting token i, plus token i itself, as {id: {logprob, rank,
decoded_token}}) from float32 forward passes. `scored_sequences` counts each sequence scored.

`mode` breaks the whole server instead, as a dead or wrong teacher would:

    always_500    500 to every chat request
    html          200 with an HTML page on every path (a web page, not an API)
    hang          accepts every chat request and never answers
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any

from aiohttp import web

MODES = ("normal", "always_500", "html", "hang")
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>\n"
MARKER = re.compile(r"\[\[(400|429|500|503|drop|badjson|hang)(?:x(\d+))?\]\]")
SAY = re.compile(r"\[\[say:(.*?)\]\]", re.S)


def expected_answer(prompt: str) -> str:
    """The answer the server gives to `prompt` when no content fault applies."""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    return f"Answer {digest}: {prompt[::-1]}"


class FaultyOpenAIServer:
    def __init__(
        self,
        api_key: str = "test-key",
        model: str = "test-teacher",
        latency_s: float = 0.0,
        hang_s: float = 5.0,
        retry_after_s: int = 1,
        record_requests: bool = True,
        mode: str = "normal",
        rate_limit_requests: tuple[int, float] | None = None,
        rate_limit_tokens: tuple[int, float] | None = None,
        batch_latency_s: float = 0.2,
        scoring_model: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.api_key = api_key
        self.model = model
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.record_requests = record_requests
        self.attempts: Counter[str] = Counter()  # prompt -> requests received
        self.answered: Counter[str] = Counter()  # prompt -> 200 answers sent
        self.total_requests = 0
        self.unauthorized = 0
        self.rate_limits: dict[str, list[float]] = {}  # name -> [capacity, per second, level, updated]
        for name, limit in (("requests", rate_limit_requests), ("tokens", rate_limit_tokens)):
            if limit is not None:
                capacity, window_s = limit
                self.rate_limits[name] = [float(capacity), capacity / window_s, float(capacity), time.monotonic()]
        self.rate_limited = 0
        self.batch_latency_s = batch_latency_s
        self.files: dict[str, tuple[bytes, str, str]] = {}  # id -> (content, filename, purpose)
        self.batches: dict[str, dict[str, Any]] = {}
        self.batches_created = 0
        self.files_uploaded = 0
        self.uploaded_bytes: list[bytes] = []
        self.scoring_model = scoring_model
        self._scorer: Any = None  # the model, loaded on the first completions request
        self.scored_sequences: Counter[tuple[int, ...]] = Counter()

    # -- app -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        if self.mode == "html":
            app.router.add_route("*", "/{tail:.*}", self.html_page)
            return app
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        return app

    async def html_page(self, request: web.Request) -> web.Response:
        self.total_requests += 1
        return web.Response(text=HTML_PAGE, content_type="text/html")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total_requests": self.total_requests,
                "unauthorized": self.unauthorized,
                "attempts": dict(self.attempts),
                "answered": dict(self.answered),
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.attempts.clear()
        self.answered.clear()
        self.total_requests = 0
        self.unauthorized = 0
        return web.json_response({"ok": True})

    @staticmethod
    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"error": {"message": message, "type": "test_error", "code": status}}
        return web.json_response(body, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        self.unauthorized += 1
        return False

    def _take_rate_limit(self, tokens: int) -> tuple[dict[str, str], float | None]:
        """Rate-limit headers after taking one request of `tokens`; and the seconds to wait
        when a bucket is empty (then nothing is taken)."""
        now = time.monotonic()
        need = {"requests": 1.0, "tokens": float(tokens)}
        wait = None
        for name, bucket in self.rate_limits.items():
            capacity, rate, level, updated = bucket
            bucket[2] = min(capacity, level + (now - updated) * rate)
            bucket[3] = now
            if bucket[2] < need[name]:
                wait = max(wait or 0.0, (need[name] - bucket[2]) / rate)
        if wait is None:
            for name, bucket in self.rate_limits.items():
                bucket[2] -= need[name]
        headers = {}
        for name, (capacity, rate, level, _) in self.rate_limits.items():
            headers[f"x-ratelimit-limit-{name}"] = str(int(capacity))
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(level)))
            headers[f"x-ratelimit-reset-{name}"] = format_duration((capacity - level) / rate)
        return headers, wait

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.total_requests += 1
        if self.mode == "always_500":
            return self._error(500, "Internal server error.")
        if self.mode == "hang":
            await _while_connected(request, float("inf"))
            raise asyncio.CancelledError
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        body = await request.json()
        if body.get("model") != self.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        limit_headers: dict[str, str] = {}
        if self.rate_limits:
            prompt_words = sum(len(str(m.get("content") or "").split()) for m in body.get("messages") or [])
            limit_headers, wait = self._take_rate_limit(prompt_words + int(body.get("max_tokens") or 0))
            if wait is not None:
                self.rate_limited += 1
                return self._error(
                    429, "Rate limit reached.", {**limit_headers, "retry-after-ms": str(int(wait * 1000) + 1)}
                )
        prompt = self._prompt(body)
        if self.record_requests:
            self.attempts[prompt] += 1
        attempt = self.attempts[prompt]
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

        for match in MARKER.finditer(prompt):
            kind, limit = match.group(1), match.group(2)
            if limit is not None and attempt > int(limit):
                continue
            if kind == "drop":
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
            if kind == "badjson":
                return web.Response(text='{"id": "chatcmpl-bad", "choices": [{"mess', content_type="application/json")
            if kind == "hang":
                if not await _while_connected(request, self.hang_s):
                    raise asyncio.CancelledError
        status, payload, headers = self._chat_result(body, prompt, attempt)
        return web.json_response(payload, status=status, headers={**limit_headers, **headers})

    async def completions(self, request: web.Request) -> web.Response:
        """Prompt logprobs of token-id prompts (vLLM's scoring use of the completions endpoint)."""
        self.total_requests += 1
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        body = await request.json()
        if body.get("model") != self.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        prompts, k = body.get("prompt"), body.get("prompt_logprobs")
        if self.scoring_model is None or k is None or not isinstance(prompts, list):
            return self._error(400, "this server scores token-id prompts with prompt_logprobs only")
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        for prompt in prompts:
            self.scored_sequences[tuple(prompt)] += 1
        scored = await asyncio.get_running_loop().run_in_executor(None, self._prompt_logprobs, prompts, int(k))
        choices = [
            {"index": index, "text": "", "finish_reason": "length", "logprobs": None, "prompt_logprobs": entries}
            for index, entries in enumerate(scored)
        ]
        tokens = sum(len(prompt) for prompt in prompts)
        return web.json_response(
            {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": self.model, "choices": choices,
             "usage": {"prompt_tokens": tokens, "completion_tokens": len(prompts), "total_tokens": tokens + len(prompts)}}
        )

    def _prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list[dict[str, Any] | None]]:
        import torch
        from transformers import AutoModelForCausalLM

        if self._scorer is None:
            self._scorer = AutoModelForCausalLM.from_pretrained(self.scoring_model, dtype=torch.float32).eval()
        scored = []
        for prompt in prompts:
            with torch.no_grad():
                logprobs = torch.log_softmax(self._scorer(torch.tensor([prompt])).logits[0].float(), dim=-1)  # (L, V)
            entries: list[dict[str, Any] | None] = [None]
            for index in range(1, len(prompt)):
                row = logprobs[index - 1]  # (V,) predicts prompt[index]
                values, ids = row.topk(k)
                entry = {
                    str(token): {"logprob": value, "rank": rank + 1, "decoded_token": f"token_id:{token}"}
                    for rank, (token, value) in enumerate(zip(ids.tolist(), values.tolist()))
                }
                actual = prompt[index]
                if str(actual) not in entry:
                    rank = int((row > row[actual]).sum()) + 1
                    entry[str(actual)] = {"logprob": float(row[actual]), "rank": rank, "decoded_token": f"token_id:{actual}"}
                entries.append(entry)
            scored.append(entries)
        return scored

    @staticmethod
    def _prompt(body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")

    def _chat_result(
        self, body: dict[str, Any], prompt: str, attempt: int, in_batch: bool = False
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers) of a chat request, as a pure function of the
        request and the attempt number (the connection-level faults are the HTTP
        handler's; in a batch they are 500s)."""
        for match in MARKER.finditer(prompt):
            kind, limit = match.group(1), match.group(2)
            if limit is not None and attempt > int(limit):
                continue
            if kind == "400":
                return 400, _error_body(400, "Invalid prompt: flagged by the test server."), {}
            if kind == "429":
                return 429, _error_body(429, "Rate limit reached."), {"Retry-After": str(self.retry_after_s)}
            if kind in ("500", "503") or in_batch:
                status = 503 if kind == "503" else 500
                return status, _error_body(status, "Server error."), {}

        finish_reason = "stop"
        say = SAY.search(prompt)
        if say:
            content = say.group(1)
        elif "[[empty]]" in prompt:
            content = ""
        elif "[[garbage]]" in prompt:
            content = "lorem ipsum ### ??? ### lorem"
        else:
            content = expected_answer(prompt)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = content.split(" ") if content else []
        if "[[truncate]]" in prompt or (max_tokens and len(tokens) > max_tokens):
            finish_reason = "length"
            tokens = tokens[: max(1, (max_tokens or 4) // 2)] if tokens else []
            content = " ".join(tokens)

        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
        top_k = body.get("top_logprobs") or 0
        if body.get("logprobs"):
            choice["logprobs"] = {"content": _fake_logprobs(tokens, top_k)}
        self.answered[prompt] += 1
        payload = {
            "id": f"chatcmpl-{hashlib.sha1(prompt.encode()).hexdigest()[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt.split()) + len(tokens),
            },
        }
        return 200, payload, {}

    # -- Files and Batches ------------------------------------------------------------------
    async def upload_file(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        form = await request.post()
        upload = form.get("file")
        purpose = str(form.get("purpose") or "")
        if upload is None or not hasattr(upload, "file"):
            return self._error(400, "No file in the upload.")
        content = upload.file.read()
        if purpose == "batch" and len(content) > 200 * 1024 * 1024:
            return self._error(400, "A batch input file is limited to 200 MB.")
        self.files_uploaded += 1
        self.uploaded_bytes.append(content)
        return web.json_response(self._add_file(content, upload.filename, purpose))

    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files) + 1:06d}"
        self.files[file_id] = (content, filename, purpose)
        return {
            "id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
        }

    async def file_content(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        stored = self.files.get(request.match_info["file_id"])
        if stored is None:
            return self._error(404, "No such file.")
        return web.Response(body=stored[0], content_type="application/octet-stream")

    async def create_batch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        body = await request.json()
        stored = self.files.get(body.get("input_file_id"))
        if stored is None or stored[2] != "batch":
            return self._error(400, "input_file_id is not a file uploaded with purpose=batch.")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return self._error(400, "Unsupported endpoint or completion_window.")
        lines = stored[0].splitlines()
        if len(lines) > 50_000:
            return self._error(400, "A batch is limited to 50,000 requests.")
        self.batches_created += 1
        batch_id = f"batch_{len(self.batches) + 1:06d}"
        batch = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "completion_window": "24h",
            "input_file_id": body["input_file_id"], "status": "validating", "created_at": int(time.time()),
            "output_file_id": None, "error_file_id": None, "metadata": body.get("metadata"),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        self.batches[batch_id] = batch
        asyncio.get_running_loop().call_later(self.batch_latency_s / 2, self._start_batch, batch_id)
        return web.json_response(batch)

    def _start_batch(self, batch_id: str) -> None:
        self.batches[batch_id]["status"] = "in_progress"
        asyncio.get_running_loop().call_later(self.batch_latency_s / 2, self._finish_batch, batch_id)

    def _finish_batch(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        output, errors = [], []
        for number, line in enumerate(self.files[batch["input_file_id"]][0].splitlines()):
            item = json.loads(line)
            body = item["body"]
            if body.get("model") != self.model:
                status, payload = 404, _error_body(404, f"The model `{body.get('model')}` does not exist.")
            else:
                prompt = self._prompt(body)
                self.attempts[prompt] += 1
                status, payload, _ = self._chat_result(body, prompt, self.attempts[prompt], in_batch=True)
            result = {
                "id": f"batch_req_{batch_id}_{number}",
                "custom_id": item["custom_id"],
                "response": {"status_code": status, "request_id": f"req_{number}", "body": payload},
                "error": None,
            }
            (output if status == 200 else errors).append(json.dumps(result))
        if output:
            batch["output_file_id"] = self._add_file(("\n".join(output) + "\n").encode(), "output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._add_file(("\n".join(errors) + "\n").encode(), "errors.jsonl", "batch_output")["id"]
        batch["request_counts"] = {"total": len(output) + len(errors), "completed": len(output), "failed": len(errors)}
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())

    async def get_batch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._error(404, "No such batch.")
        return web.json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        data = list(reversed(self.batches.values()))
        return web.json_response(
            {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
             "last_id": data[-1]["id"] if data else None, "has_more": False}
        )


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "test_error", "code": status}}


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


async def _while_connected(request: web.Request, seconds: float) -> bool:
    """Sleep up to `seconds`, less if the client goes away (then False): a handler left
    sleeping for a client that gave up would hold the server's shutdown."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if request.transport is None or request.transport.is_closing():
            return False
        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return True


def _fake_logprobs(tokens: list[str], top_k: int) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` in the API's shape: per answer token its text, logprob,
    UTF-8 `bytes` and `top_logprobs` (the same three fields per alternative, best first).
    Each word is one token (a leading space after the first); its alternatives are the word
    itself, its upper-case form, the word with a full stop, then filler tokens."""
    out = []
    for index, token in enumerate(tokens):
        piece = token if index == 0 else " " + token
        candidates = [(piece, -0.2), (piece.upper(), -2.5), (piece + ".", -3.0)]
        candidates = [c for i, c in enumerate(candidates) if c[0] not in [d[0] for d in candidates[:i]]]
        candidates += [(f" alt{j}", -5.0 - j) for j in range(max(0, top_k - len(candidates)))]  # Σ p < 1
        top = [{"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))} for text, logprob in candidates]
        out.append({"token": piece, "logprob": -0.2, "bytes": list(piece.encode("utf-8")), "top_logprobs": top[:top_k]})
    return out


class ServerThread:
    """Runs a `FaultyOpenAIServer` on 127.0.0.1:`port` in a background thread."""

    def __init__(self, server: FaultyOpenAIServer, port: int) -> None:
        self.server = server
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.server.app(), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--model", default="test-teacher")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=5.0)
    parser.add_argument("--no-record", action="store_true", help="skip per-prompt counters (benchmarks)")
    parser.add_argument("--mode", choices=MODES, default="normal", help="break the whole server (see above)")
    args = parser.parse_args()
    server = FaultyOpenAIServer(
        mode=args.mode,
        api_key=args.api_key,
        model=args.model,
        latency_s=args.latency_ms / 1000,
        hang_s=args.hang_s,
        record_requests=not args.no_record,
    )
    web.run_app(server.app(), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=2048)


if __name__ == "__main__":
    main()

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

    # -- app -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        if self.mode == "html":
            app.router.add_route("*", "/{tail:.*}", self.html_page)
            return app
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_get("/health", self.health)
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

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.total_requests += 1
        if self.mode == "always_500":
            return self._error(500, "Internal server error.")
        if self.mode == "hang":
            await _while_connected(request, float("inf"))
            raise asyncio.CancelledError
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.unauthorized += 1
            return self._error(401, "Incorrect API key provided.")
        body = await request.json()
        if body.get("model") != self.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        messages = body.get("messages") or []
        prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        if self.record_requests:
            self.attempts[prompt] += 1
        attempt = self.attempts[prompt]
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

        for match in MARKER.finditer(prompt):
            kind, limit = match.group(1), match.group(2)
            if limit is not None and attempt > int(limit):
                continue
            if kind == "400":
                return self._error(400, "Invalid prompt: flagged by the test server.")
            if kind == "429":
                return self._error(429, "Rate limit reached.", {"Retry-After": str(self.retry_after_s)})
            if kind in ("500", "503"):
                return self._error(int(kind), "Server error.")
            if kind == "drop":
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
            if kind == "badjson":
                return web.Response(text='{"id": "chatcmpl-bad", "choices": [{"mess', content_type="application/json")
            if kind == "hang":
                if not await _while_connected(request, self.hang_s):
                    raise asyncio.CancelledError

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
        return web.json_response(
            {
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
        )


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
    out = []
    for index, token in enumerate(tokens):
        piece = token if index == 0 else " " + token
        top = [{"token": piece, "logprob": -0.1, "bytes": None}]
        top += [{"token": f"alt{j}", "logprob": -2.0 - j, "bytes": None} for j in range(max(0, top_k - 1))]
        out.append({"token": piece, "logprob": -0.1, "bytes": None, "top_logprobs": top[:top_k]})
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

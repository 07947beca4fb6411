"""Client-side rate limits: token buckets for `requests_per_minute`/`tokens_per_minute`,
and (`adaptive_rate_limit`) a mirror of the API's own buckets from its x-ratelimit-*
headers and Retry-After."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

MAX_RETRY_AFTER_S = 120.0


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


"""SIGINT and SIGTERM for every `distill` command: stop within seconds, keep what was received.

`exit_on_signals` wraps one command. On the first SIGINT or SIGTERM:

1. the hooks the running command registered with `cancel_on_interrupt` run at once on a
   helper thread (the build cancels its teacher requests in flight; every answer already
   received is in the ledger, committed as it arrived);
2. the main thread gets `KeyboardInterrupt`, as Python does for SIGINT, so the command
   unwinds through its `finally` blocks and Prefect marks the run crashed;
3. a deadline starts: if the process still runs `GRACE_S` after the signal (a stage busy
   in C code, a Prefect API that no longer answers), the temporary Prefect server is
   stopped and the process exits anyway.

The exit code is 128 + the signal number: 130 for SIGINT, 143 for SIGTERM. The temporary
Prefect server (the one Prefect starts when no `PREFECT_API_URL` is set) stops with the
process: Prefect stops it at exit, after its last logs are sent, and a forced exit stops
it first.

The signal is also noticed through `signal.set_wakeup_fd`, by a watcher thread: while a
flow runs, Prefect swaps in its own SIGTERM handler (which raises `TerminationSignal`),
and a main thread busy in C code runs no Python handler until it returns; the byte the C
handler writes to the wakeup pipe reaches the watcher either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 7.0  # from the signal to a forced exit; the promise to users is 10 s

_lock = threading.Lock()
_hooks: list[Callable[[], None]] = []
_received: int | None = None  # the first signal's number
_exiting = False  # past the command: a later signal must not break the clean-up


def received_signal() -> int | None:
    """The number of the first SIGINT/SIGTERM this process received, if any."""
    return _received


@contextlib.contextmanager
def cancel_on_interrupt(hook: Callable[[], None]) -> Iterator[None]:
    """Run `hook` (from another thread, so it must be thread-safe) as soon as a signal
    arrives while the block runs; at once if one already has."""
    with _lock:
        _hooks.append(hook)
        already = _received is not None
    if already:
        _run_hook(hook)
    try:
        yield
    finally:
        with _lock:
            _hooks.remove(hook)


def _run_hook(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception as error:  # noqa: BLE001 - the other hooks and the deadline must still run
        print(f"distill: while stopping: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def _begin(signum: int) -> None:
    """The first signal: tell the user, run the hooks, start the deadline (idempotent)."""
    global _received
    with _lock:
        if _received is not None:
            return
        _received = signum
        hooks = list(_hooks)
    name = signal.Signals(signum).name
    print(
        f"distill: got {name}; stopping within {GRACE_S:.0f} s. Teacher requests in flight are cancelled; "
        "answers already received stay in the ledger, so rerunning the same command continues "
        "without paying for them again.",
        file=sys.stderr,
        flush=True,
    )

    def stop_then_deadline() -> None:
        started = time.monotonic()
        for hook in hooks:
            _run_hook(hook)
        time.sleep(max(0.0, GRACE_S - (time.monotonic() - started)))
        print(f"distill: still running {GRACE_S:.0f} s after {name}; exiting now.", file=sys.stderr, flush=True)
        _hard_exit(signum)

    threading.Thread(target=stop_then_deadline, name="distill-signal-deadline", daemon=True).start()


def _handler(signum: int, frame: object) -> None:
    _begin(signum)
    if not _exiting:
        raise KeyboardInterrupt


def _watch(read_fd: int) -> None:
    with contextlib.closing(os.fdopen(read_fd, "rb", buffering=0)) as pipe:
        while data := pipe.read(64):  # b"" once the write end is closed
            for signum in data:
                if signum in SIGNALS:
                    _begin(signum)


def _temporary_prefect_servers() -> list[subprocess.Popen]:
    """The server processes Prefect started for this process (none when PREFECT_API_URL is set)."""
    module = sys.modules.get("prefect.server.api.server")
    if module is None:  # never imported: no temporary server
        return []
    # Prefect keeps its temporary servers here (there is no public accessor); its own
    # `stop` runs at exit, which a forced exit skips.
    servers = list(getattr(module.SubprocessASGIServer, "_instances", {}).values())
    return [server.server_process for server in servers if getattr(server, "server_process", None) is not None]


def stop_temporary_prefect_server(wait_s: float = 3.0) -> None:
    """Stop the server Prefect started for this process, if it still runs."""
    for process in _temporary_prefect_servers():
        if process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(wait_s)


def _hard_exit(signum: int) -> None:
    import multiprocessing

    with contextlib.suppress(Exception):
        stop_temporary_prefect_server(wait_s=1.0)
    with contextlib.suppress(Exception):
        for child in multiprocessing.active_children():  # teacher client processes
            child.terminate()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Handle SIGINT/SIGTERM for one command (main thread only); see the module docstring.
    After a signal, leaving the block raises SystemExit(128 + signal number), whatever the
    command did."""
    global _exiting, _received
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    _exiting, _received = False, None
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="distill-signal-watch", daemon=True).start()
    try:
        yield
    finally:
        _exiting = True
        signum = _received
        signal.set_wakeup_fd(previous_fd)
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(write_fd)  # the watcher's read returns b"" and it ends
        if signum is not None:
            print(f"distill: stopped after {signal.Signals(signum).name}.", file=sys.stderr, flush=True)
            if any(process.poll() is not None for process in _temporary_prefect_servers()):
                # The terminal's Ctrl-C reached the temporary server too: Prefect would spend
                # the grace period at exit retrying logs to a server that is gone.
                _hard_exit(signum)
            raise SystemExit(128 + signum)

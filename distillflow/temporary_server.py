"""Prefect's temporary server, started as the command starts instead of at its first flow.

With no server configured and none left running by `distill server start`, Prefect starts
a temporary server (a uvicorn subprocess with no UI) the first time a flow needs the API,
and waits for it: on two cores 5-15 s, after the command has already spent seconds
importing its stage and checking its config. `start_early` starts that same subprocess,
with Prefect's own command line and settings, before the command begins, and hands it to
Prefect as the temporary server: when the flow asks for it, Prefect waits only for what is
left of the start. Prefect still owns it afterwards: it stops it at exit (its `atexit`
hook), and a Ctrl-C stops it through distillflow/interrupt.py, which finds it where
Prefect keeps it.

The hand-over relies on `SubprocessASGIServer` returning one shared instance per port
(`_instances`, key None for the temporary server), as in Prefect 3.
"""

from __future__ import annotations

import atexit
import time
from typing import Any


def start_early() -> None:
    """Start Prefect's temporary server now, in the background; Prefect waits for it (up to
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) when a flow first needs the API.
    Call only when no server is configured (no PREFECT_API_URL)."""
    from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():  # the user turned temporary servers off
        return
    if None in SubprocessASGIServer._instances:  # already started (or handed over) in this process
        return

    class EarlyTemporaryServer(SubprocessASGIServer):
        """The temporary server, its process started before Prefect asks for it."""

        def start(self, timeout: int | None = None) -> None:
            if self.server_process is None:  # stopped, or never started: Prefect's own start
                super().start(timeout)
                return
            wait_until_healthy(self, timeout)

    server = EarlyTemporaryServer()
    server.port = server.find_available_port()
    server.server_process = server._run_uvicorn_command()
    server.running = True
    atexit.register(server.stop)
    subprocess_server_logger.info(
        f"Starting temporary server on {server.address} (no UI; `distill server start` keeps one running, with its UI)"
    )


def wait_until_healthy(server: Any, timeout: int | None) -> None:
    """Prefect's wait for its temporary server (same health check, same timeout setting,
    same restart on another port when the port was taken: exit code 3)."""
    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    deadline = time.monotonic() + (timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if server.server_process.poll() == 3:
                server.port = server.find_available_port()
                server.server_process = server._run_uvicorn_command()
                continue
            if server.server_process.poll() is not None:
                break
            try:
                if client.get(f"{server.api_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    code = server.server_process.poll()
    server.stop()
    raise RuntimeError(
        "the temporary Prefect server did not answer "
        + (f"(it exited with code {code})" if code is not None else "in time")
        + "; run `distill server start` for a lasting server, or set PREFECT_API_URL to a running one, "
        "or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine"
    )

"""Real Prefect processes for the slow end-to-end tests: `prefect server start`, `distill
serve`/`distill deploy`, `prefect worker start`, each a subprocess in its own process group,
logged to a file, time-bounded, and stopped (with everything it started) on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Prefect subprocess: its own home, offline, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


class Processes:
    """Subprocesses started by one test; `stop_all` ends each one's whole process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.services: set[str] = set()  # the ones that must keep running (not one-shot commands)

    def start(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, service: bool = True
    ) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, process))
        if service:
            self.services.add(name)
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.started:
            if name in self.services and process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for _, process in reversed(self.started):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group (flow-run subprocesses, chromium helpers)
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait(5)


@contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    group = Processes(log_dir)
    try:
        yield group
    finally:
        group.stop_all()


def wait_until(check: Callable[[], Any], timeout: float, what: str, group: Processes | None = None, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if group is not None:
            group.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def start_server(
    group: Processes,
    home: Path,
    port: int,
    ui: bool = False,
    database_url: str | None = None,
    timeout: float = 150,
    auth_string: str | None = None,
) -> str:
    """`prefect server start` on loopback (with basic auth when `auth_string` is given);
    returns its API URL once /api/health (open without credentials) answers."""
    extra = {"PREFECT_UI_ENABLED": "true" if ui else "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    if database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    if auth_string:
        extra["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    env = base_env(home, **extra)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    group.start("server", argv, env)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(healthy, timeout, "prefect server start", group)
    return url


@contextmanager
def api(url: str) -> Iterator[Any]:
    """A sync Prefect client of the server at `url` (this test process's settings point elsewhere)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def wait_for_deployment(url: str, name: str, timeout: float, group: Processes) -> Any:
    from prefect.exceptions import ObjectNotFound

    def read() -> Any:
        with api(url) as client:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                return None

    return wait_until(read, timeout, f"deployment {name}", group, every=1.0)


def wait_for_flow_run(url: str, flow_run_id: Any, timeout: float, group: Processes) -> Any:
    """The flow run once it reached a terminal state."""

    def finished() -> Any:
        with api(url) as client:
            run = client.read_flow_run(flow_run_id)
        return run if run.state and run.state.type.value in TERMINAL_STATES else None

    return wait_until(finished, timeout, f"flow run {flow_run_id} to finish", group, every=1.0)


def flow_run_logs(url: str, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with api(url) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)[-4000:]

"""Shared test set-up: offline, quiet Prefect in a private home, and one test server harness."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prefect reads its settings at import time: point it at a private home, keep it offline.
_PREFECT_HOME = tempfile.mkdtemp(prefix="distillflow-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Where failed `distill` commands keep their log (distillflow/failures.py): not the user's home.
os.environ.setdefault("DISTILL_LOG_DIR", tempfile.mkdtemp(prefix="distillflow-test-logs-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.pop("PREFECT_API_URL", None)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _flows_back_to_prefect():
    """A CLI call in a test can run its flows without orchestration (no server configured
    yet, distillflow/runs.py); later tests of the same process get Prefect's flows back.
    It can also point the process at the server `distill server start` recorded
    (local_server.use_running_server sets PREFECT_API_URL): that server stops with its test,
    so the variable goes back to what it was, or a later test's subprocesses inherit a dead URL."""
    api_url = os.environ.get("PREFECT_API_URL")
    yield
    runs = sys.modules.get("distillflow.runs")
    if runs is not None and runs._active:
        runs.deactivate()
    if api_url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = api_url


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs 10–20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, for CLI runs in subprocesses.

    Yields the environment a subprocess needs to report to it (PREFECT_API_URL, home).
    """
    import subprocess
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-server-home")
    server_port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(server_port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{server_port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)
    client_home = tmp_path_factory.mktemp("prefect-client-home")
    yield {
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(client_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, prefect_harness):
    """`distill demo` at tiny budgets, run once per session: the demo teacher, its dataset
    (with captured top-k logprobs), three trained students and their eval."""
    from distillflow.flows.demo import DemoBudget, demo_command

    workdir = tmp_path_factory.mktemp("tiny-demo")
    budget = DemoBudget(num_prompts=40, student_steps=3, eval_prompts=8, speed_prompts=2)
    result = demo_command(workdir, budget=budget)
    return {"workdir": workdir, "budget": budget, "result": result}

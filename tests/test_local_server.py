"""`distill server start/stop` and how commands find the server: a recorded server that
answers is used, a stale record or a configured PREFECT_API_URL is not; a second command's
run reaches the running server's API; stopping leaves no process behind."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from distillflow import local_server
from distillflow.runs import ORCHESTRATION_ENV
from tests.test_build import API_KEY, GOOD, write_config, write_seeds
from tests.openai_server import FaultyOpenAIServer, ServerThread

ROOT = Path(__file__).resolve().parents[1]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server():
    """A stand-in that answers GET /api/health like a Prefect server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "prefect"


def test_a_recorded_server_that_answers_is_used(home, health_server, monkeypatch):
    local_server.write_state(local_server.ServerState(url=health_server, pid=os.getpid(), log="x.log"))
    assert local_server.use_running_server() == health_server
    assert os.environ["PREFECT_API_URL"] == health_server
    monkeypatch.delenv("PREFECT_API_URL")


def test_a_stale_record_is_ignored(home, port):
    local_server.write_state(local_server.ServerState(url=f"http://127.0.0.1:{port}/api", pid=1, log="x.log"))
    assert local_server.use_running_server() is None
    assert "PREFECT_API_URL" not in os.environ


def test_a_configured_server_wins(home, health_server, monkeypatch):
    local_server.write_state(local_server.ServerState(url=health_server, pid=os.getpid(), log="x.log"))
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
    assert local_server.use_running_server() is None
    monkeypatch.delenv("PREFECT_API_URL")
    home.mkdir(parents=True, exist_ok=True)
    (home / "profiles.toml").write_text('active = "p"\n[profiles.p]\nPREFECT_API_URL = "http://elsewhere:4200/api"\n')
    assert local_server.use_running_server() is None
    assert "PREFECT_API_URL" not in os.environ


def test_stop_without_a_server_says_so(home):
    assert local_server.stop_server() is None


def _distill(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillflow.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _no_server_env(home: Path) -> dict[str, str]:
    """This process's environment for a `distill` subprocess with PREFECT_HOME=home and no
    Prefect server configured."""
    env = {**os.environ, "PREFECT_HOME": str(home), "DISTILL_TEST_KEY": API_KEY, "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def _processes_with_home(home: Path) -> list[int]:
    """Processes whose environment has PREFECT_HOME=home."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_second_command_reuses_the_started_server_and_stop_leaves_nothing(tmp_path, port):
    home = tmp_path / "prefect"
    env = _no_server_env(home)
    started = _distill(["server", "start", "--port", str(_free_port())], env, tmp_path, timeout=200)
    try:
        assert started.returncode == 0, started.stderr
        state = json.loads((home / local_server.STATE_NAME).read_text())
        seeds = tmp_path / "seeds.jsonl"
        write_seeds(seeds, GOOD[:3])
        with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as teacher:
            config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url)
            built = _distill(["build", str(config)], env, tmp_path)
        assert built.returncode == 0, built.stderr
        assert f"runs go to the Prefect server at {state['url']}" in built.stderr
        assert "Starting temporary server" not in built.stderr
        request = urllib.request.Request(f"{state['url']}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
    finally:
        stopped = _distill(["server", "stop"], env, tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not (home / local_server.STATE_NAME).exists()
    deadline = time.monotonic() + 5
    while _processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with_home(home) == []


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_no_server_flows_run_without_orchestration_and_prefect_mode_keeps_the_temporary_server(tmp_path, port):
    """No server configured or running: the build runs its flow as plain calls (no temporary
    server, no database, the same `Flow run '…'` lines) and a failure is one paragraph;
    DISTILL_ORCHESTRATION=prefect brings Prefect's temporary server back."""
    home = tmp_path / "prefect"
    env = _no_server_env(home)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # as a user's terminal shows (the suite's default is WARNING)
    env.pop(ORCHESTRATION_ENV, None)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as teacher:
        config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url)
        built = _distill(["build", str(config)], env, tmp_path)
        assert built.returncode == 0, built.stderr
        assert "temporary server" not in built.stderr
        assert "Flow run 'build-dataset' - wrote 6 rows (0 rejects)" in built.stderr
        assert (tmp_path / "out" / "manifest.json").is_file()
        assert not list(home.glob("*.db"))  # no Prefect database was made

        dead = write_config(tmp_path / "dead.yaml", seeds, tmp_path / "dead", "http://127.0.0.1:9/v1", max_retries=0)
        failed = _distill(["build", str(dead)], env, tmp_path)
        assert failed.returncode == 1
        paragraphs = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
        assert len(paragraphs) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "start the teacher server, or correct teacher.base_url" in paragraphs[0]

        prefect_mode = _distill(["build", str(config)], {**env, ORCHESTRATION_ENV: "prefect"}, tmp_path, timeout=300)
    assert prefect_mode.returncode == 0, prefect_mode.stderr
    assert "Stopping temporary server" in prefect_mode.stderr
    assert list(home.glob("*.db"))  # Prefect's temporary server keeps its runs in PREFECT_HOME
    assert _processes_with_home(home) == []

"""The local Prefect server that `distill server start` leaves running, and how commands find it.

Without a server, Prefect starts a temporary one inside every command (no UI, 10-15 s on
two cores before the command does anything) and stops it at exit. `distill server start`
starts `prefect server start` once, in its own session, with the UI, and records its URL
and process id in `$PREFECT_HOME/distill-server.json`. Every later `distill` command that
has no `PREFECT_API_URL` reads that file and, if the server answers `GET /api/health`
within `HEALTH_TIMEOUT_S`, uses it: its runs are in that server's UI and the command pays
no server start. A stale file (server gone) costs one refused connection and is ignored.
`distill server stop` stops the whole process group and removes the file.

Nothing here imports Prefect: the URL must be in the environment before Prefect reads its
settings (at its import).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from distillflow.storage.atomic import write_text_atomic

STATE_NAME = "distill-server.json"
LOG_NAME = "distill-server.log"
HEALTH_TIMEOUT_S = 0.5  # one probe of a server on this machine; a live one answers in milliseconds
START_TIMEOUT_S = 180.0  # first start creates the database: 10-40 s on two busy cores
STOP_TIMEOUT_S = 10.0
DEFAULT_PORT = 4200


class LocalServerError(RuntimeError):
    """`distill server` could not start or stop the server; the message says why and what to do."""


@dataclass(frozen=True)
class ServerState:
    """What `distill server start` records about the server it started."""

    url: str  # the API, e.g. http://127.0.0.1:4200/api
    pid: int  # the `prefect server start` process, leader of its own process group
    log: str  # its stdout and stderr


def prefect_home() -> Path:
    """$PREFECT_HOME, or Prefect's default ~/.prefect."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def state_path() -> Path:
    return prefect_home() / STATE_NAME


def read_state() -> ServerState | None:
    """The recorded server, or None when there is none or the file is unreadable."""
    try:
        data = json.loads(state_path().read_text(encoding="utf-8"))
        return ServerState(url=str(data["url"]), pid=int(data["pid"]), log=str(data["log"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(state: ServerState) -> None:
    """Write the state file atomically (a reader sees the old file or the whole new one)."""
    write_text_atomic(state_path(), json.dumps(asdict(state)), "the local server's state file")


def is_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether the Prefect API at `url` answers `GET /health` with 200 within `timeout_s`
    (the health endpoint needs no auth string)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def api_url_configured() -> bool:
    """Whether Prefect will be told about a server by the environment, the active profile,
    or a `.env` / `prefect.toml` in the working directory (then that server is used)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    profiles = _read_toml(prefect_home() / "profiles.toml")
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    if profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"):
        return True
    if _read_toml(Path("prefect.toml")).get("api", {}).get("url"):
        return True
    with contextlib.suppress(OSError):
        return "PREFECT_API_URL" in Path(".env").read_text(encoding="utf-8")
    return False


def running_server() -> ServerState | None:
    """The server `distill server start` recorded, if it answers now."""
    state = read_state()
    if state is None or not is_healthy(state.url):
        return None
    return state


def use_running_server() -> str | None:
    """Point this process (and its children) at the recorded server when no server is
    configured and that one answers; returns its URL, or None (Prefect then starts a
    temporary server for the command). Call before Prefect is imported."""
    if api_url_configured():
        return None
    state = running_server()
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = state.url
    return state.url


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    return ""


def start_server(port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> tuple[ServerState, bool]:
    """Start `prefect server start` on 127.0.0.1 in its own session (it outlives this
    process and a Ctrl-C in this terminal), wait until it answers, record it. Returns the
    state and whether it was started now (False: the recorded one already answers)."""
    existing = running_server()
    if existing is not None:
        return existing, False
    if port is None:
        port = DEFAULT_PORT if _port_is_free(DEFAULT_PORT) else _free_port()
    elif not _port_is_free(port):
        raise LocalServerError(
            f"distill server start: port {port} on 127.0.0.1 is in use; stop what listens there "
            f"or pass another port (`distill server start --port {port + 1}`)"
        )
    log = prefect_home() / LOG_NAME
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    state = ServerState(url=f"http://127.0.0.1:{port}/api", pid=process.pid, log=str(log))
    deadline = time.monotonic() + timeout_s
    while not is_healthy(state.url):
        if process.poll() is not None:
            raise LocalServerError(
                f"distill server start: the Prefect server exited with code {process.returncode} before it "
                f"answered; its log ({log}) ends with:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            _stop_group(process.pid)
            raise LocalServerError(
                f"distill server start: the Prefect server did not answer {state.url}/health within "
                f"{timeout_s:.0f} s and was stopped; see its log {log}"
            )
        time.sleep(0.2)
    write_state(state)
    return state, True


def _is_prefect_server(pid: int) -> bool:
    """Whether `pid` is still a `prefect server start` process (not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"prefect" in command and b"server" in command


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pgid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after `timeout_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # reaps it when this process started it
        time.sleep(0.1)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, 0)


def stop_server(timeout_s: float = STOP_TIMEOUT_S) -> ServerState | None:
    """Stop the recorded server and every process of its group; remove the state file.
    Returns what was recorded (None: nothing was)."""
    state = read_state()
    if state is None:
        return None
    if _is_prefect_server(state.pid):
        _stop_group(state.pid, timeout_s)
    if _group_alive(state.pid) and _is_prefect_server(state.pid):
        raise LocalServerError(
            f"distill server stop: the Prefect server (process group {state.pid}) still runs after SIGKILL; "
            f"stop it by hand (`kill -9 -{state.pid}`)"
        )
    state_path().unlink(missing_ok=True)
    return state

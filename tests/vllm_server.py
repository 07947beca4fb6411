"""Start a real vLLM OpenAI-compatible server on CPU, from `.venv-vllm`, for tests and benches.

    with VLLMServer(model_dir, served_model_name="teacher") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")

The server runs in its own process group on a free port of 127.0.0.1; entering waits for
`/health` (raising with the log's tail if the process dies or the timeout passes), leaving
stops the whole group. `scripts/setup_vllm_venv.sh` creates the venv. The model must have
head_dim ≥ 32 (vLLM's CPU attention) and is served in float32, where vLLM's logprobs match
transformers within ~1e-5.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"


def vllm_available() -> bool:
    return VLLM_PYTHON.is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    def __init__(
        self,
        model_dir: str | Path,
        served_model_name: str = "teacher",
        startup_timeout_s: float = 300.0,
        max_model_len: int = 2048,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()  # the server runs in its own directory
        self.served_model_name = served_model_name
        self.startup_timeout_s = startup_timeout_s
        self.max_model_len = max_model_len
        self.extra_args = extra_args or []
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_s: float | None = None  # measured time from spawn to healthy
        self._workdir = Path(tempfile.mkdtemp(prefix="distillflow-vllm-"))
        self.log_path = self._workdir / "server.log"
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", "float32",
            "--enforce-eager",
            "--max-model-len", str(self.max_model_len),
            # The default batched-token budget crashed the CPU engine on per-request seeds.
            "--max-num-batched-tokens", "32768",
            "--max-logprobs", "20",
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_CACHE_ROOT=str(self._workdir / "cache"),
            TMPDIR=str(self._workdir),
        )
        return env

    def __enter__(self) -> VLLMServer:
        if not vllm_available():
            raise RuntimeError(f"{VLLM_PYTHON} not found; run `bash scripts/setup_vllm_venv.sh` first")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self._workdir,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_healthy(self, started: float) -> None:
        health = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() - started < self.startup_timeout_s:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self._process.returncode} while starting; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"vLLM was not healthy after {self.startup_timeout_s:.0f} s; log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after `grace_s`."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass


if __name__ == "__main__":  # manual use: python tests/vllm_server.py MODEL_DIR
    import sys

    # Stop the server on SIGTERM/SIGINT too (a background shell job ignores SIGINT).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    with VLLMServer(sys.argv[1]) as server:
        print(f"serving {server.model_dir} as {server.served_model_name!r} at {server.base_url} "
              f"(ready in {server.startup_s:.1f} s); Ctrl-C stops it", flush=True)
        signal.pause()

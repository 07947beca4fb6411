"""One writer per output directory: a second build on a held directory is refused at once,
with the holder named, before any teacher call; a holder killed with SIGKILL frees it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distillflow.storage.lock import OutputInUse, output_lock
from distillflow.storage.manifest import read_manifest
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, GOOD, ROOT, write_config, write_seeds
from tests.test_local_server import _distill, _no_server_env

HOLD = """
import sys, time
from distillflow.storage.lock import output_lock
with output_lock(sys.argv[1], "a test holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_held_directory_refuses_a_second_holder_until_released(tmp_path):
    second = r"is being written by pid \d+ .*the first run.*another output_dir"
    with output_lock(tmp_path / "out", "the first run"), pytest.raises(OutputInUse, match=second):
        with output_lock(tmp_path / "out", "the second run"):
            pass
    with output_lock(tmp_path / "out", "the second run"):  # released when the first block ended
        pass


def test_a_build_on_a_held_output_dir_is_refused_and_a_killed_holder_frees_it(tmp_path, port):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    out = tmp_path / "out"
    env = _no_server_env(tmp_path / "prefect")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as teacher:
            config = write_config(tmp_path / "c.yaml", seeds, out, teacher.base_url)
            refused = _distill(["build", str(config)], env, ROOT)
            assert refused.returncode != 0
            assert f"{out} is being written by pid {holder.pid}" in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr
            assert teacher.server.total_requests == 0  # refused before paying for anything

            holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
            holder.wait(timeout=10)
            rerun = _distill(["build", str(config)], env, ROOT)
            assert rerun.returncode == 0, rerun.stderr
            assert read_manifest(out)["counts"]["accepted"] == 6
    finally:
        holder.kill()
        holder.wait(timeout=10)

"""Faults of the machine, not the teacher (issue 31): a disk that fills during a build, a
read-only output directory. The disk is a real small file system (a tmpfs mounted for the
test, which needs root: skipped otherwise), the teacher the project's own test server,
which counts every request."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillflow.failures import DiskWriteError, disk_error_in, error_message
from distillflow.records import TeacherAnswer
from distillflow.storage.ledger import Ledger
from distillflow.storage.manifest import write_json_atomic
from distillflow.tasks.teacher import GroupCommit
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, write_config, write_seeds
from tests.test_resume import ledger_rows

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 8
# Long prompts (the test server answers with the prompt reversed): the ledger grows fast.
PROMPTS = [f"Disk question {i}: " + " ".join(f"term{i}x{j}" for j in range(60)) for i in range(400)]


def answer(text: str = "x" * 400) -> TeacherAnswer:
    return TeacherAnswer(text, "stop", "test-teacher")


# -- a small real file system ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(disk: Path) -> None:
    """Take every free byte of `disk` (a filler file; `free` removes it)."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def free(disk: Path) -> None:
    (disk / "filler").unlink()


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True, capture_output=True, timeout=30)


# -- the pieces ------------------------------------------------------------------------------------


def test_a_full_disk_in_the_ledger_is_one_error_naming_the_path_and_the_space(small_disk):
    path = small_disk / ".ledger" / "teacher.sqlite"
    with Ledger(path) as ledger:
        ledger.put_many([("kept", answer(), time.time())])
        fill(small_disk)
        with pytest.raises(DiskWriteError) as raised:
            for number in range(1000):  # SQLite may fit a few rows in pages it already has
                ledger.put_many([(f"k{number}-{i}", answer(), time.time()) for i in range(8)])
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)  # the real error, not a failed ROLLBACK
        message = error_message(raised.value)
        assert message.startswith(f"no space left on the disk: writing the ledger {path} failed (")
        assert f"free of 8.0 MiB on {small_disk}" in message and "rerun the same command" in message
        free(small_disk)
        ledger.put_many([("after", answer(), time.time())])  # usable again once there is room
        assert set(ledger.get_many(["kept", "after"])) == {"kept", "after"}


def test_a_full_disk_leaves_no_temp_file_and_names_the_file(small_disk):
    fill(small_disk)
    with pytest.raises(DiskWriteError, match=f"writing the JSON file {small_disk / 'state.json'} failed"):
        write_json_atomic(small_disk / "state.json", {"rows": list(range(100_000))})
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]


def test_a_read_only_directory_is_one_error_naming_it(small_disk):
    remount(small_disk, "ro")
    try:
        with pytest.raises(DiskWriteError) as raised:
            Ledger(small_disk / "out" / ".ledger" / "teacher.sqlite")
    finally:
        remount(small_disk, "rw")
    message = error_message(raised.value)
    assert message.startswith(f"read-only file system: cannot write the ledger {small_disk / 'out'}")
    assert f"{small_disk} is mounted read-only" in message


def test_the_root_cause_is_named_not_the_secondary_error():
    """A refused write anywhere in the chain wins over the error that was raised last."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-00000.parquet")
        except OSError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active")
    except sqlite3.OperationalError as error:
        message = error_message(error)
    assert message.startswith("no space left on the disk: writing a file /data/out/part-00000.parquet failed")
    assert disk_error_in(RuntimeError("unrelated")) is None
    denied = OSError(errno.EACCES, "Permission denied", "/etc/shadow")  # reads raise it too: left as it is
    assert error_message(denied) == str(denied)


def test_the_shard_writer_process_reports_a_full_disk_as_its_one_paragraph(small_disk):
    from datetime import datetime, timezone

    from distillflow.tasks.filters.config import FiltersConfig
    from distillflow.tasks.build.shard_writer import ShardWriterProcess

    row = {"id": "a", "prompt": "p", "response": "An answer long enough to keep.", "strategy": "seed",
           "parent_id": None, "teacher_model": "m", "finish_reason": "stop", "prompt_tokens": 1,
           "completion_tokens": 6, "created_at": datetime.now(timezone.utc)}
    (small_disk / "staging").mkdir()
    fill(small_disk)
    with ShardWriterProcess(FiltersConfig(), small_disk / "staging", False) as writer:
        writer.add(0, [row], [])
        with pytest.raises(DiskWriteError) as raised:
            writer.write(0, 1, 0)
    message = str(raised.value)
    assert message.startswith("no space left on the disk: writing the Parquet file ") and str(small_disk) in message
    assert "Traceback" not in message
    assert not list((small_disk / "staging").rglob("*.parquet*"))  # no partial or temporary file


def test_a_quota_is_named_as_such():
    error = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/home/me/out/.ledger/teacher.sqlite")
    message = error_message(error)
    assert message.startswith("disk quota exceeded: writing a file /home/me/out/.ledger/teacher.sqlite failed")
    assert "`quota -s`" in message


class FailingLedger:
    def __init__(self) -> None:
        self.commits = 0

    def put_many(self, entries) -> None:
        self.commits += 1
        raise DiskWriteError("no space left on the disk: writing the ledger /x failed")


def test_a_failed_group_commit_fails_its_waiters_and_stops_the_run_without_a_loop_traceback():
    async def run() -> tuple[list, list, FailingLedger]:
        loop = asyncio.get_running_loop()
        callback_errors: list = []
        loop.set_exception_handler(lambda _loop, context: callback_errors.append(context))
        failures: list[Exception] = []
        ledger = FailingLedger()
        commits = GroupCommit(ledger, loop, on_failure=failures.append)
        waiting = [commits.add(f"k{i}", answer())[1] for i in range(3)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        later = await asyncio.gather(commits.add("late", answer())[1], return_exceptions=True)
        assert all(isinstance(result, DiskWriteError) for result in results + later)
        return callback_errors, failures, ledger

    callback_errors, failures, ledger = asyncio.run(run())
    assert callback_errors == []  # asyncio's "Exception in callback ..." would print a traceback
    assert len(failures) == 1 and ledger.commits == 1  # one failure stops it; no commit is tried again


# -- a whole build ---------------------------------------------------------------------------------


class FillingServer(FaultyOpenAIServer):
    """The test teacher, which fills `disk` when its `fill_at`-th request arrives."""

    def __init__(self, disk: Path, fill_at: int, **kwargs) -> None:
        super().__init__(api_key=API_KEY, **kwargs)
        self.disk, self.fill_at = disk, fill_at
        self.filled_after: int | None = None  # requests received when the disk was filled

    async def chat(self, request):
        if self.filled_after is None and self.total_requests + 1 >= self.fill_at:
            fill(self.disk)
            self.filled_after = self.total_requests
        return await super().chat(request)


def run_build(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillflow.cli", "build", str(config)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def last_paragraph(stderr: str) -> str:
    return stderr[stderr.rindex("error: "):]


@pytest.mark.slow
@pytest.mark.parametrize("client_processes", [1, 2], ids=["in-process", "client-processes"])
def test_a_disk_that_fills_mid_build_stops_it_at_once_and_the_rerun_pays_only_for_requests_in_flight(
    small_disk, tmp_path, port, prefect_server, client_processes
):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    out = small_disk / "out"
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY}
    server = FillingServer(small_disk, fill_at=120, latency_s=0.02)
    with ServerThread(server, port):
        config = write_config(tmp_path / "c.yaml", seeds, out, f"http://127.0.0.1:{port}/v1",
                              max_concurrency=CONCURRENCY, batch_size=32, client_processes=client_processes)
        first = run_build(config, env)
        assert first.returncode == 1, first.stderr[-3000:]
        error = last_paragraph(first.stderr)
        assert error.startswith("error: no space left on the disk: writing the ledger "), error
        assert f"free of 8.0 MiB on {small_disk}" in error and "rerun the same command" in error, error
        assert "Traceback" not in first.stderr and "Exception in callback" not in first.stderr, first.stderr[-3000:]
        sent_after_fill = server.total_requests - server.filled_after
        # The first failed commit stops every request; only those already on their way get out.
        assert sent_after_fill <= CONCURRENCY, sent_after_fill
        answered = {prompt for prompt, count in server.answered.items() if count}
        recorded = ledger_rows(out / ".ledger" / "teacher.sqlite")
        assert not (out / "manifest.json").exists()

        free(small_disk)
        server.attempts.clear()
        rerun = run_build(config, env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        paid_twice = [prompt for prompt in server.attempts if prompt in answered]
        assert len(paid_twice) <= CONCURRENCY, len(paid_twice)
    from distillflow.storage.parquet import read_table

    assert read_table(out / "data").num_rows == len(PROMPTS)
    print(f"\n{error}")
    print(f"full disk ({client_processes} client process(es)): {recorded} answers recorded, "
          f"{sent_after_fill} requests sent after the disk filled, {len(paid_twice)} prompts paid twice on the rerun")


@pytest.mark.slow
def test_a_read_only_output_directory_stops_the_build_before_any_request(small_disk, tmp_path, port, prefect_server):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS[:20])
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY}
    (small_disk / "out").mkdir()
    remount(small_disk, "ro")
    try:
        server = FaultyOpenAIServer(api_key=API_KEY)
        with ServerThread(server, port):
            config = write_config(tmp_path / "c.yaml", seeds, small_disk / "out", f"http://127.0.0.1:{port}/v1")
            result = run_build(config, env)
    finally:
        remount(small_disk, "rw")
    assert result.returncode == 1, result.stderr[-3000:]
    error = last_paragraph(result.stderr)
    assert error.startswith("error: read-only file system: cannot write "), error
    assert f"{small_disk} is mounted read-only" in error and "Traceback" not in result.stderr
    assert server.total_requests == 0


# -- training checkpoints --------------------------------------------------------------------------


class TensorEngine:
    """What a DeepSpeed engine does when it saves: its files into the tag's directory."""

    def __init__(self, megabytes: int) -> None:
        import torch

        self.weights = torch.zeros(megabytes * 262_144)  # float32: 4 bytes each

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        import torch

        assert not save_latest  # `latest` is written once the checkpoint is complete
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": self.weights, **client_state}, directory / "mp_rank_00_model_states.pt")


def test_a_checkpoint_cut_short_by_a_full_disk_is_never_resumed_from(small_disk):
    import torch

    from distillflow.training.checkpoints import resume_tag, save_checkpoint

    checkpoints = small_disk / "run" / "checkpoints"
    engine = TensorEngine(megabytes=5)  # one fits on the 8 MiB disk, two do not
    save_checkpoint(engine, checkpoints, 2, keep=2, rank=0)
    assert resume_tag(checkpoints) == "step-00000002"
    with pytest.raises(DiskWriteError) as raised:
        save_checkpoint(engine, checkpoints, 4, keep=2, rank=0)
    message = error_message(raised.value)
    assert message.startswith(f"no space left on the disk: writing the training checkpoint {checkpoints / 'step-00000004'}")
    assert not (checkpoints / "step-00000004").exists()  # the partial save is gone, its space free again
    assert resume_tag(checkpoints) == "step-00000002"
    state = torch.load(checkpoints / "step-00000002" / "mp_rank_00_model_states.pt")
    assert state["step"] == 2


def test_a_checkpoint_without_its_marker_is_ignored_and_pruned(tmp_path):
    from distillflow.training.checkpoints import COMPLETE, resume_tag, save_checkpoint

    checkpoints = tmp_path / "checkpoints"
    engine = TensorEngine(megabytes=0)
    for step in (2, 4):
        save_checkpoint(engine, checkpoints, step, keep=5, rank=0)
    (checkpoints / "step-00000004" / COMPLETE).unlink()  # a save killed before its marker
    (checkpoints / "latest").write_text("step-00000004")  # what DeepSpeed itself would resume from
    assert resume_tag(checkpoints) == "step-00000002"
    save_checkpoint(engine, checkpoints, 6, keep=5, rank=0)
    assert sorted(path.name for path in checkpoints.glob("step-*")) == ["step-00000002", "step-00000006"]
    assert (checkpoints / "latest").read_text() == "step-00000006"

"""A build in shards: the shard size does not change the dataset, a killed build resumes at
its first unfinished shard without paying twice, and dedup stays global across shards.
Real Prefect, the real openai client against tests/openai_server.py, real Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import distillflow.tasks.teacher.openai_client as teacher_module
from distillflow.records import PromptRecord, content_id
from distillflow.storage.manifest import read_manifest
from distillflow.storage.parquet import list_shards, read_table
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.passes import filter_prompts
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, write_config, write_seeds
from tests.test_resume import ledger_rows

ROOT = Path(__file__).resolve().parents[1]

# Long enough that a one-word edit keeps the character 5-gram Jaccard above 0.8.
BASE = "Describe in plain words how a {0} keeps its shape when the weather turns cold and wet over many long winters"
PROMPTS = [f"Question {i}: what does the number {i * 13} mean to a {['cook', 'pilot', 'poet'][i % 3]}?" for i in range(23)]
NEAR = (BASE.format("wooden bridge"), BASE.format("wooden bridge").replace("cold", "icy"))
EXACT = ("Explain TOPIC twelve in two sentences.", "explain   topic twelve in two sentences.")
PROMPTS += [
    *NEAR,  # a near duplicate pair (one word changed)
    *EXACT,  # an exact duplicate after normalisation
    "Rejected by the API [[400]]",
    "Cut short [[truncate]] by the length limit",
    "Nothing comes back [[empty]]",
]


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)


def sharded_config(path: Path, seeds: Path, out: Path, base_url: str, shard_rows: int, **teacher) -> Path:
    write_config(path, seeds, out, base_url, **teacher)
    config = yaml.safe_load(path.read_text())
    config["filters"] = {}  # defaults: exact and near-duplicate dedup on
    config["dataset"] = {"shard_rows": shard_rows}
    path.write_text(yaml.safe_dump(config))
    return path


def dataset_of(out: Path) -> tuple[list[dict], list[tuple]]:
    """Accepted rows in order (without created_at, which comes from each run's ledger) and
    rejects as a sorted list of (id, reason, duplicate_of, response)."""
    data = read_table(out / "data").drop(["created_at"]).to_pylist()
    rejects = read_table(out / "rejects").to_pylist()
    return data, sorted((r["id"], r["reason"], r["duplicate_of"], r["response"]) for r in rejects)


def generated_order(prompts: list[str]) -> list[str]:
    """The order the build answers seed prompts in (a hash of their ids, not file order)."""
    from distillflow.prompts.config import PromptsConfig
    from distillflow.prompts.generate import generate_prompts

    rows, _, _ = generate_prompts(
        [PromptRecord.make(p, "seed") for p in prompts], PromptsConfig(num_prompts=1000, strategies={"seed": 1.0})
    )
    return [row.prompt for row in rows]


def test_shard_size_does_not_change_the_dataset(prefect_harness, port, tmp_path, monkeypatch):
    import distillflow.tasks.build.teacher_stage as stage_module
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        results = {}
        for shard_rows, shards in ((1000, 1), (10, 3), (4, 7)):
            out = tmp_path / f"out-{shards}"
            # 3 shards: a first batch of 2 prompts, then batches of 3 (a shard ends mid-batch).
            teacher = {"batch_size": 3, "max_concurrency": 2} if shards == 3 else {}
            monkeypatch.setattr(stage_module, "FIRST_BATCH", 2 if shards == 3 else 256)
            config = sharded_config(tmp_path / f"{shards}.yaml", seeds, out, server.base_url, shard_rows, **teacher)
            manifest = build_command(config)
            assert manifest["build"]["shards"] == shards and manifest["invariant"]["holds"]
            assert len(list_shards(out / "data")) == shards  # one data file per shard
            assert not (out / ".building").exists()  # the staging area is gone once the dataset is in place
            results[shards] = (dataset_of(out), manifest)
    one, _ = results[1]
    assert len(one[0]) == len(PROMPTS) - 5  # a near and an exact duplicate, a 400, a truncated, an empty answer
    for shards in (3, 7):
        data, rejects = results[shards][0]
        assert data == one[0], f"{shards} shards: accepted rows differ from one shard"
        assert rejects == one[1], f"{shards} shards: rejects differ from one shard"
        assert results[shards][1]["counts"] == results[1][1]["counts"]
        assert results[shards][1]["reject_reasons"] == results[1][1]["reject_reasons"]


def test_a_near_duplicate_in_a_later_shard_is_removed_and_never_asked(prefect_harness, port, tmp_path):
    """One prompt per shard, so the planted pairs are split over shards; the one first in
    input order (the build's prompt order) is kept, the other is dropped before the teacher."""
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    order = generated_order(PROMPTS)
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        out = tmp_path / "out"
        manifest = build_command(sharded_config(tmp_path / "c.yaml", seeds, out, server.base_url, 1))
        asked = dict(server.server.attempts)
    assert manifest["build"]["shards"] == len(PROMPTS) - 2
    data, rejects = dataset_of(out)
    for pair, reason in (
        (NEAR, "near_duplicate"),
        (EXACT, "exact_duplicate"),
    ):
        first, second = sorted(pair, key=order.index)
        assert first in {row["prompt"] for row in data}
        assert (content_id(second), reason, content_id(first), None) in rejects
        assert second not in asked and first in asked  # decided before the teacher was paid


def test_spilled_signatures_decide_as_in_memory(tmp_path):
    from tests.test_dedup import planted_corpus

    texts, _ = planted_corpus(seed=5)
    records = [PromptRecord.make(text, "seed") for text in texts]
    config = FiltersConfig(near_dedup={"threshold": 0.7}, batch_size=97)
    in_memory = filter_prompts(records, config)
    spilled = filter_prompts(records, config, spill_dir=tmp_path / "spill")
    assert [r.id for r in spilled[0]] == [r.id for r in in_memory[0]]
    assert [(r.id, r.reason, r.duplicate_of) for r in spilled[1]] == [(r.id, r.reason, r.duplicate_of) for r in in_memory[1]]
    assert sum(r.reason == "near_duplicate" for r in spilled[1]) > 50
    assert not list((tmp_path / "spill").glob("*"))  # the signature file is removed after the pass


# -- SIGKILL mid-shard and between shards --------------------------------------------------------

CONCURRENCY = 8
RESUMABLE = [f"Sharded resumable prompt {i}: describe the number {i * 7}." for i in range(300)]


def start_build(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distillflow.cli", "build", str(config)],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def finished_shards(out: Path) -> list[int]:
    try:
        state = json.loads((out / ".building" / "state.json").read_text())
    except (OSError, ValueError):
        return []
    return [entry["index"] for entry in state["finished"]]


def kill_when(process: subprocess.Popen, ready, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the build made no progress"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


@pytest.mark.slow
def test_sigkill_mid_shard_and_between_shards_resumes_to_the_same_dataset(prefect_harness, prefect_server, port, tmp_path):
    """300 prompts (about 225 after near-dedup) in shards of 60: killed while shard 0 is half answered, then again right
    after shard 1 is written; the third run finishes. Same dataset as one uninterrupted
    build, finished shards are kept as they are, and no answer is paid for twice beyond
    the requests on the wire at each kill."""
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, RESUMABLE)
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY}
    fake = FaultyOpenAIServer(api_key=API_KEY, latency_s=0.04)  # 200 answers/s
    with ServerThread(fake, port) as server:
        straight = sharded_config(tmp_path / "a.yaml", seeds, tmp_path / "a", server.base_url, 60,
                                  max_concurrency=CONCURRENCY, batch_size=20)
        build_command(straight)
        fake.answered.clear()

        out = tmp_path / "b"
        config = sharded_config(tmp_path / "b.yaml", seeds, out, server.base_url, 60,
                                max_concurrency=CONCURRENCY, batch_size=20)
        ledger = out / ".ledger" / "teacher.sqlite"
        paid_before = 0
        for run, ready in enumerate([
            lambda: ledger_rows(ledger) >= 30,  # mid-shard: shard 0 half answered, nothing written
            lambda: len(finished_shards(out)) >= 2,  # between shards: shard 1 just written
        ]):
            log = tmp_path / f"run{run}.log"
            kill_when(start_build(config, env, log), ready, log)
            assert not (out / "manifest.json").exists()
            recorded = ledger_rows(ledger)
            assert paid_before <= recorded < len(RESUMABLE)
            paid_before = recorded
        kept = finished_shards(out)
        assert len(kept) >= 2
        inode = {i: (out / ".building" / "data" / f"part-{i:05d}.parquet").stat().st_ino for i in kept}
        answered_before = {prompt for prompt, count in fake.answered.items() if count}
        fake.attempts.clear()
        rerun = subprocess.run(
            [sys.executable, "-m", "distillflow.cli", "build", str(config)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        asked_again = [prompt for prompt in fake.attempts if prompt in answered_before]
        assert len(asked_again) <= CONCURRENCY, asked_again  # at most what was on the wire at the last kill
        assert len(fake.attempts) <= len(RESUMABLE) - recorded + CONCURRENCY
        assert sum(fake.answered.values()) <= len(RESUMABLE) + 2 * CONCURRENCY  # over all three runs

    manifest = read_manifest(out)
    assert manifest["build"]["resumed_shards"] == len(kept)
    for index, number in inode.items():  # finished shards were kept, not rewritten
        assert (out / "data" / f"part-{index:05d}.parquet").stat().st_ino == number
    assert dataset_of(out) == dataset_of(tmp_path / "a")
    assert read_table(out / "data").num_rows == manifest["counts"]["accepted"] > 200  # near duplicates dropped


# -- teacher replicas ------------------------------------------------------------------------------


def replica_config(tmp_path: Path, seeds: Path, out: Path, urls: list[str]) -> Path:
    path = sharded_config(tmp_path / f"{out.name}.yaml", seeds, out, urls[0], 10, first_contact_s=1, max_retries=2)
    config = yaml.safe_load(path.read_text())
    config["teacher"]["base_url"] = urls  # a list: the replicas
    path.write_text(yaml.safe_dump(config))
    return path


def test_requests_are_spread_over_replicas_and_a_dead_one_is_taken_out(prefect_harness, tmp_path, capfd):
    from distillflow.flows.build import build_command
    from tests.conftest import free_port

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS[:23])
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as one, \
            ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as two:
        single = build_command(sharded_config(tmp_path / "s.yaml", seeds, tmp_path / "single", one.base_url, 10))
        one.server.total_requests = 0
        both = build_command(replica_config(tmp_path, seeds, tmp_path / "both", [one.base_url, two.base_url]))
        spread = (one.server.total_requests, two.server.total_requests)
        one.server.total_requests = two.server.total_requests = 0
        capfd.readouterr()
        survived = build_command(replica_config(tmp_path, seeds, tmp_path / "survived", [dead, two.base_url]))
        err = capfd.readouterr().err
    assert min(spread) >= 8 and sum(spread) == 23, spread  # round-robin over the two
    assert f"teacher replica {dead} taken out of rotation" in err and "1 of 2 replicas left" in err
    assert two.server.total_requests == 23  # the live replica answered everything
    for manifest in (both, survived):
        assert manifest["counts"] == single["counts"] and manifest["teacher_failures"]["failed"] == 0
    assert dataset_of(tmp_path / "both") == dataset_of(tmp_path / "single")
    assert dataset_of(tmp_path / "survived") == dataset_of(tmp_path / "single")


def test_all_replicas_dead_stops_the_run(prefect_harness, tmp_path):
    from distillflow.flows.build import build_command
    from distillflow.tasks.teacher import TeacherUnreachableError
    from tests.conftest import free_port

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS[:5])
    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(TeacherUnreachableError, match="all 2 teacher replicas .* are out of rotation") as raised:
        build_command(replica_config(tmp_path, seeds, tmp_path / "out", dead))
    assert time.monotonic() - started < 20
    assert dead[0] in str(raised.value) and dead[1] in str(raised.value) and "teacher_error:connection" in str(raised.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


# -- fan-out: shards on Dask workers ----------------------------------------------------------------


@pytest.mark.slow
def test_two_dask_workers_give_the_single_process_dataset(prefect_harness, port, tmp_path):
    """A local Dask cluster of 2 worker processes, each answering whole shards with its own
    teacher client and its own connection to the shared ledger."""
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS + RESUMABLE[:60])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        single = build_command(sharded_config(tmp_path / "one.yaml", seeds, tmp_path / "one", server.base_url, 10))
        server.server.attempts.clear()
        path = sharded_config(tmp_path / "two.yaml", seeds, tmp_path / "two", server.base_url, 10)
        config = yaml.safe_load(path.read_text())
        config["dataset"]["workers"] = 2
        path.write_text(yaml.safe_dump(config))
        fanned = build_command(path)
        asked = server.server.attempts
    assert fanned["build"]["shards"] == single["build"]["shards"] >= 4
    assert dataset_of(tmp_path / "two") == dataset_of(tmp_path / "one")
    assert fanned["counts"] == single["counts"] and fanned["reject_reasons"] == single["reject_reasons"]
    assert fanned["teacher_failures"] == single["teacher_failures"]
    assert fanned["teacher_usage"]["paid_requests"] == len(asked) == single["teacher_usage"]["paid_requests"]
    assert max(asked.values()) == 1  # each prompt asked once, by one of the workers


# -- fan-out: shards as flow runs on a Prefect work pool --------------------------------------------


@pytest.mark.slow
def test_two_work_pool_workers_give_the_single_process_dataset(prefect_harness, prefect_server, port, tmp_path):
    """A real Prefect server, two `prefect worker start --type process` workers on one pool, and
    `distill build` with `dataset.work_pool`: every shard is a `build-shard` flow run that one
    of the workers picks up. Same rows, ids and rejects as one process; each prompt asked once."""
    from distillflow.flows.build import build_command
    from tests.prefect_processes import TERMINAL_STATES, api, processes

    pool = "shards"
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS + RESUMABLE[:60])
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server, processes(tmp_path / "logs") as group:
        single = build_command(sharded_config(tmp_path / "one.yaml", seeds, tmp_path / "one", server.base_url, 10))
        server.server.attempts.clear()
        for worker in range(2):
            group.start(f"worker{worker}", [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                            "--type", "process", "--name", f"w{worker}"], env, cwd=ROOT)
        path = sharded_config(tmp_path / "pool.yaml", seeds, tmp_path / "pool", server.base_url, 10)
        config = yaml.safe_load(path.read_text())
        config["dataset"].update(work_pool=pool, workers=2, worker_wait_s=120)
        path.write_text(yaml.safe_dump(config))
        run = subprocess.run([sys.executable, "-m", "distillflow.cli", "build", str(path)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:] + group.log("worker0")[-2000:]
        asked = dict(server.server.attempts)
        with api(prefect_server["PREFECT_API_URL"]) as client:
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName

            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["build-shard"])))
    # the server is shared with other tests' pool builds: count this build's shard runs only
    runs = [run for run in runs if str(tmp_path / "pool") in json.dumps(run.parameters, default=str)]
    fanned = read_manifest(tmp_path / "pool")
    assert fanned["build"]["shards"] == single["build"]["shards"] >= 4
    assert len(runs) == fanned["build"]["shards"]
    assert {r.state.type.value for r in runs} == {"COMPLETED"} <= TERMINAL_STATES
    assert len({r.work_pool_name for r in runs}) == 1
    assert dataset_of(tmp_path / "pool") == dataset_of(tmp_path / "one")
    assert fanned["counts"] == single["counts"] and fanned["reject_reasons"] == single["reject_reasons"]
    assert fanned["teacher_usage"]["paid_requests"] == len(asked) == single["teacher_usage"]["paid_requests"]
    assert max(asked.values()) == 1  # each prompt asked once, by one of the workers


def test_a_work_pool_without_a_server_or_with_a_budget_is_refused_before_any_call(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from distillflow.config import ConfigError, load_config
    from distillflow.flows.shard_runs import register_shard_deployment

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    path = sharded_config(tmp_path / "pool.yaml", seeds, tmp_path / "pool", "http://127.0.0.1:9/v1", 10)
    config = yaml.safe_load(path.read_text())
    config["dataset"]["work_pool"] = "shards"
    config["teacher"]["max_total_tokens"] = 10_000
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"dataset.work_pool='shards' cannot be combined with teacher.max_budget_usd"):
        load_config(path)
    del config["teacher"]["max_total_tokens"]
    config["dataset"]["dask_address"] = "tcp://127.0.0.1:8786"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(path)
    del config["dataset"]["dask_address"]
    path.write_text(yaml.safe_dump(config))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            register_shard_deployment(load_config(path))


# -- the shard writer process ------------------------------------------------------------------


def test_the_shard_writer_process_writes_what_the_build_writes_in_process(prefect_harness, port, tmp_path, monkeypatch):
    """Response filters and shard files in the child process (large builds) or in the build's
    own process (small ones), requests from the build's process or from a client process of
    their own (large builds): the same rows, rejects and counts, shard by shard, and every
    prompt asked once."""
    import distillflow.tasks.build.teacher_stage as stage_module
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, [*PROMPTS, "[[say:I'm sorry, but I can't help with that.]] Say no", "Echo [[say:Echo]]"])
    results = {}
    teachers: dict[str, str] = {}
    make_teacher = stage_module.make_teacher

    def recording_make_teacher(*args, **kwargs):
        teacher = make_teacher(*args, **kwargs)
        teachers[name] = type(teacher).__name__
        return teacher

    monkeypatch.setattr(stage_module, "make_teacher", recording_make_teacher)
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        for name, writer_minimum, client_minimum in (
            ("in-process", 10**9, 10**9), ("writer", 0, 10**9), ("client process", 0, 0),
        ):
            monkeypatch.setattr(stage_module, "SHARD_WRITER_MIN_PROMPTS", writer_minimum)
            monkeypatch.setattr(stage_module, "CLIENT_PROCESS_MIN_PROMPTS", client_minimum)
            out = tmp_path / name
            config = sharded_config(tmp_path / f"{name}.yaml", seeds, out, server.base_url, 10, batch_size=4)
            asked = server.server.total_requests
            manifest = build_command(config)
            assert manifest["build"]["shards"] == 3 and manifest["invariant"]["holds"]
            results[name] = (dataset_of(out), manifest, server.server.total_requests - asked)
    assert teachers == {"in-process": "OpenAITeacher", "writer": "OpenAITeacher", "client process": "PooledTeacher"}
    for name in ("writer", "client process"):
        (data, rejects), manifest, asked = results[name]
        assert (data, rejects) == results["in-process"][0], name
        assert manifest["counts"] == results["in-process"][1]["counts"], name
        assert manifest["reject_reasons"] == results["in-process"][1]["reject_reasons"], name
        assert manifest["teacher_usage"]["paid_requests"] == results["in-process"][1]["teacher_usage"]["paid_requests"]
        assert manifest["teacher_usage"]["paid_requests"] == asked == results["in-process"][2], name
    reasons = {reason for _, reason, _, _ in rejects}
    assert {"teacher_error:400", "truncated", "empty", "refusal"} <= reasons, reasons


def test_a_failing_or_dead_shard_writer_is_reported_not_waited_for(tmp_path):
    from datetime import datetime, timezone

    from distillflow.tasks.build.shard_writer import ShardWriterError, ShardWriterProcess

    row = {"id": "a", "prompt": "p", "response": "An answer long enough to keep.", "strategy": "seed", "parent_id": None,
           "teacher_model": "m", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 6,
           "created_at": datetime.now(timezone.utc)}
    with ShardWriterProcess(FiltersConfig(), tmp_path / "staging", False) as writer:
        writer.add(0, [row], [])
        result = writer.write(0, 1, 0)
        assert (result.answered, result.accepted) == (1, 1)
        assert (tmp_path / "staging" / "data" / "part-00000.parquet").exists()
        writer.add(1, [{**row, "response": 12345}])  # not text: the filters fail in the child
        with pytest.raises(ShardWriterError, match="failed on shard 1: AttributeError"):
            writer.write(1, 1, 1)
        writer._process.kill()
        writer._process.wait()
        started = time.monotonic()
        with pytest.raises(ShardWriterError, match=r"died while .*\(exit code -9"):
            writer.add(2, [row] * 20000)
            writer.write(2, 20000, 2)
        assert time.monotonic() - started < 10


def test_the_shard_writer_does_not_rerun_the_callers_script(tmp_path):
    """A user's script that builds without an `if __name__ == "__main__":` guard runs once:
    the writer is a fresh interpreter on its own module, not a re-import of the script."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pathlib import Path\n"
        "from distillflow.tasks.filters.config import FiltersConfig\n"
        "from distillflow.tasks.build.shard_writer import ShardWriterProcess\n"
        "print('script ran', flush=True)\n"
        f"with ShardWriterProcess(FiltersConfig(), Path({str(tmp_path / 'staging')!r}), False) as writer:\n"
        "    print('accepted', writer.write(0, 0, 0).accepted, flush=True)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["script ran", "accepted 0"]


def test_a_shards_prompts_come_back_in_the_batches_asked_for(tmp_path):
    from distillflow.tasks.build.shards import (
        read_shard_prompt_batches,
        read_shard_prompts,
        write_shard_prompts,
    )

    records = [PromptRecord(f"id-{i}", f"prompt {i}", "seed", None if i % 2 else f"id-{i - 1}") for i in range(23)]
    write_shard_prompts(tmp_path, records, [(0, 13), (13, 23)])
    batches = list(read_shard_prompt_batches(tmp_path, 0, [2, 5, 5, 5]))
    assert [len(batch) for batch in batches] == [2, 5, 5, 1]  # the last holds what is left
    assert [record for batch in batches for record in batch] == records[:13]
    assert [len(batch) for batch in read_shard_prompt_batches(tmp_path, 1, [4, None])] == [4, 6]
    assert read_shard_prompts(tmp_path, 1) == records[13:]

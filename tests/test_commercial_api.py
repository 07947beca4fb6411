"""A commercial API as the teacher: price table, dry run, budget, Batch API, adaptive rate
limits — against the project's fake OpenAI server (chat, Files and Batches endpoints),
driven by the real `openai` client."""

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
from distillflow.config import ConfigError, PricingConfig, TeacherConfig, parse_config
from distillflow.storage.ledger import Ledger, request_key
from distillflow.storage.manifest import read_manifest
from distillflow.storage.parquet import read_table
from distillflow.tasks.teacher import (
    OpenAITeacher,
    answer_requests,
    build_messages,
    parse_duration_s,
    teacher_params_for_key,
)
from distillflow.tasks.teacher.choose import make_teacher as teacher_for
from tests.openai_server import FaultyOpenAIServer, ServerThread, expected_answer

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-live-planted-3f9a7c1e5b2d4680"
PROMPTS = [f"Explain topic number {i} in two sentences." for i in range(30)]


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)
    teacher_module._verified_endpoints.clear()


def write_build(tmp_path: Path, base_url: str, prompts=PROMPTS, strategies=None, **teacher) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = {
        "name": "api-build",
        "output_dir": str(tmp_path / "out"),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"strategies": strategies or {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0, "evolve": 0.0}},
        "teacher": {
            "base_url": base_url,
            "model": "test-teacher",
            "api_key_env": "DISTILL_TEST_KEY",
            "max_concurrency": 4,
            "timeout_s": 5,
            "batch_size": 8,
            "generation": {"temperature": 0.0, "max_tokens": 16},
            **teacher,
        },
        "filters": {"near_dedup": {"enabled": False}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def edit(path: Path, **teacher) -> None:
    config = yaml.safe_load(path.read_text())
    config["teacher"].update(teacher)
    path.write_text(yaml.safe_dump(config))


def assert_no_secret(*places: Path | str) -> None:
    """The planted key is in no byte of these files (recursively) or texts."""
    for place in places:
        if isinstance(place, Path):
            files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
            assert files, place
            for path in files:
                assert API_KEY.encode() not in path.read_bytes(), path
        else:
            assert API_KEY not in place


# -- price table ------------------------------------------------------------------------------


def test_price_table_costs_and_is_strict():
    pricing = PricingConfig(input_per_mtok=2.0, output_per_mtok=8.0, batch_discount=0.5)
    assert pricing.cost_usd(1_000_000, 0) == 2.0
    assert pricing.cost_usd(500_000, 250_000) == pytest.approx(1.0 + 2.0)
    assert pricing.cost_usd(500_000, 250_000, batch=True) == pytest.approx(1.5)
    base = {"name": "n", "output_dir": "o", "seeds": [{"path": "s.jsonl"}], "teacher": {"model": "m"}}
    with pytest.raises(ConfigError, match=r"teacher.pricing.input_per_token: unknown key"):
        parse_config({**base, "teacher": {"model": "m", "pricing": {"input_per_token": 1, "output_per_mtok": 1}}})
    with pytest.raises(ConfigError, match="max_budget_usd needs teacher.pricing"):
        parse_config({**base, "teacher": {"model": "m", "max_budget_usd": 5}})
    with pytest.raises(ConfigError, match="max_requests_per_file"):
        parse_config({**base, "teacher": {"model": "m", "batch": {"max_requests_per_file": 60_000}}})


def test_openai_reset_durations_parse():
    assert parse_duration_s("1s") == 1.0
    assert parse_duration_s("6m0s") == 360.0
    assert parse_duration_s("20ms") == pytest.approx(0.02)
    assert parse_duration_s("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration_s("0.5") == 0.5
    assert parse_duration_s("soon") is None and parse_duration_s(None) is None


# -- dry run ----------------------------------------------------------------------------------


def test_dry_run_sends_nothing_writes_nothing_and_matches_the_build(prefect_harness, port, tmp_path, capfd):
    from distillflow.flows.build import build_command

    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        config = write_build(
            tmp_path, server.base_url, prompts=PROMPTS + [PROMPTS[0]],  # a repeated seed is not asked twice
            pricing={"input_per_mtok": 2.0, "output_per_mtok": 10.0},
        )
        estimate = build_command(config, dry_run=True)
        shown = capfd.readouterr()
        assert server.server.total_requests == 0
        assert not (tmp_path / "out").exists()
        assert estimate["prompts_to_ask"] == estimate["prompts_after_filters"] == len(PROMPTS)
        assert estimate["output_tokens_upper_bound"] == len(PROMPTS) * 16
        # Stated estimates: 4 characters a token, half of max_tokens expected.
        assert "4 characters a token" in shown.out and "0.5 x max_tokens" in shown.out
        upper = (estimate["input_tokens"] * 2.0 + len(PROMPTS) * 16 * 10.0) / 1e6
        assert estimate["cost_usd_upper_bound"] == pytest.approx(upper, abs=1e-6)
        assert f"{len(PROMPTS)} to ask" in shown.out and f"${upper:.4f}" in shown.out

        manifest = build_command(config)
        assert manifest["counts"]["after_prompt_filters"] == estimate["prompts_after_filters"]
        assert server.server.total_requests == len(PROMPTS)
        # After the build every answer is in the ledger: nothing left to pay, and the
        # expected output comes from the answers' real lengths.
        again = build_command(config, dry_run=True)
        assert again["prompts_to_ask"] == 0 and again["cost_usd_expected"] == 0.0
        assert again["prompts_answered_in_ledger"] == len(PROMPTS)
        assert server.server.total_requests == len(PROMPTS)
    assert_no_secret(shown.out, shown.err, capfd.readouterr().out)


def test_dry_run_counts_with_the_teachers_tokenizer_and_estimates_teacher_driven_prompts(port, tmp_path, capsys):
    from transformers import AutoTokenizer

    from distillflow.flows.build import build_command
    from distillflow.training.scratch import train_tokenizer

    train_tokenizer(tmp_path / "tok")
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        config = write_build(
            tmp_path, server.base_url, tokenizer=str(tmp_path / "tok"),
            strategies={"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0, "evolve": 0.5},
        )
        estimate = build_command(config, dry_run=True)
        out = capsys.readouterr().out
        assert server.server.total_requests == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    exact = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 4 + 3 for p in PROMPTS)
    driven = estimate["teacher_driven"]["generation_requests_not_in_ledger"]
    assert driven == 15  # evolve's share of 45 prompts (0.5 / 1.5), none answered yet
    assert estimate["prompts_to_ask"] == len(PROMPTS)
    assert estimate["requests_to_pay"] == len(PROMPTS) + 2 * driven
    assert estimate["input_tokens"] > exact  # the seeds exactly, plus the estimated evolve requests
    assert "counted with the tokenizer of" in out and "teacher-driven strategies" in out
    with pytest.raises(ConfigError, match="teacher.tokenizer: cannot load a tokenizer"):
        edit(config, tokenizer=str(tmp_path / "missing"))
        build_command(config, dry_run=True)


# -- budget -----------------------------------------------------------------------------------


def test_budget_stops_cleanly_and_a_rerun_with_more_pays_only_for_the_rest(prefect_harness, port, tmp_path, capfd):
    from distillflow.flows.build import build_command

    # $1 a token: a request reserves its worst case (~19 prompt + 16 completion tokens,
    # ~$35) and costs its real usage (~7 + 10 tokens, ~$17).
    pricing = {"input_per_mtok": 1e6, "output_per_mtok": 1e6}
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY, latency_s=0.01), port) as server:
        config = write_build(tmp_path, server.base_url, pricing=pricing, max_budget_usd=250.0)
        manifest = build_command(config)
        out = tmp_path / "out"
        answered = manifest["counts"]["accepted"]
        assert 0 < answered < len(PROMPTS)
        assert manifest["stopped_by"] == "budget"
        budget = manifest["budget"]
        assert budget["max_budget_usd"] == 250.0 and 0 < budget["spent_usd"] <= 250.0
        assert budget["not_asked"] == len(PROMPTS) - answered == manifest["reject_reasons"]["not_asked:budget"]
        # Nothing refused by the budget was sent; everything answered was written.
        assert server.server.total_requests == answered
        assert len(read_table(out / "data")) == answered
        assert read_manifest(out)["stopped_by"] == "budget"
        first_run = capfd.readouterr()
        assert "stopped by the budget" in first_run.err

        edit(config, max_budget_usd=10_000.0)
        manifest = build_command(config)
        assert manifest["stopped_by"] is None and manifest["counts"]["accepted"] == len(PROMPTS)
        assert manifest["teacher_usage"]["paid_requests"] == len(PROMPTS) - answered
        assert manifest["teacher_usage"]["ledger_hits"] == answered
        assert server.server.total_requests == len(PROMPTS)
        assert set(server.server.answered.values()) == {1}  # no answer paid twice
    assert_no_secret(out, first_run.out, first_run.err, capfd.readouterr().err)


@pytest.mark.parametrize("client_processes", [1, 2])
def test_token_cap_counts_in_flight_requests(port, tmp_path, client_processes):
    with ServerThread(FaultyOpenAIServer(api_key="k", latency_s=0.05), port) as server:
        config = TeacherConfig(base_url=server.base_url, model="test-teacher", api_key_env=None, max_concurrency=8,
                               max_total_tokens=200, generation={"max_tokens": 16}, client_processes=client_processes)
        teacher = teacher_for(config, api_key="k")
        with Ledger(tmp_path / "ledger.sqlite") as ledger:
            answers = [a for a, _ in answer_requests(teacher, ledger, [build_messages(p, None) for p in PROMPTS])]
        teacher.close()
    sent = server.server.total_requests
    assert 0 < sent < len(PROMPTS)
    assert teacher.budget.exhausted
    # Eight workers at once (in one process or two, each with half the cap), yet the
    # reservations kept the total under the cap.
    assert teacher.stats.prompt_tokens + teacher.stats.completion_tokens <= 200
    assert sum(a.ok for a in answers) == sent
    assert sum(a.error == "not_asked:budget" for a in answers) == len(PROMPTS) - sent


def test_budget_too_small_for_one_request_is_a_clear_error(prefect_harness, port, tmp_path):
    from distillflow.flows.build import build_command
    from distillflow.tasks.build.steps import BudgetTooSmallError

    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        config = write_build(tmp_path, server.base_url, pricing={"input_per_mtok": 1e6, "output_per_mtok": 1e6},
                             max_budget_usd=5.0)
        with pytest.raises(BudgetTooSmallError, match="does not cover even the first request"):
            build_command(config)
        assert server.server.total_requests == 0


# -- Batch API --------------------------------------------------------------------------------


def test_batch_mode_builds_with_chunks_retries_and_the_discount(prefect_harness, port, tmp_path, capfd):
    from distillflow.flows.build import build_command

    prompts = PROMPTS[:10] + ["Refused in the batch [[400]]", "A 500 inside the batch once [[500x1]]"]
    fake = FaultyOpenAIServer(api_key=API_KEY, batch_latency_s=0.2)
    with ServerThread(fake, port) as server:
        config = write_build(
            tmp_path, server.base_url, prompts=prompts, mode="batch", batch_size=64,
            batch={"poll_interval_s": 0.05, "max_requests_per_file": 5},
            pricing={"input_per_mtok": 2.0, "output_per_mtok": 8.0, "batch_discount": 0.5},
        )
        manifest = build_command(config)
    out = tmp_path / "out"
    data = read_table(out / "data").to_pylist()
    assert {row["prompt"] for row in data} == set(prompts) - {prompts[10]}
    assert all(row["response"] == expected_answer(row["prompt"]) for row in data)
    assert manifest["reject_reasons"] == {"teacher_error:400": 1}
    # 12 requests in files of at most 5 lines: 3 batches, then one for the 500.
    assert fake.batches_created == 4 and fake.total_requests == 0
    assert [len(f.splitlines()) for f in fake.uploaded_bytes] == [5, 5, 2, 1]
    usage = manifest["teacher_usage"]
    full = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
    assert usage["estimated_cost_usd"] == pytest.approx(full * 0.5, abs=1e-6)
    with Ledger(out / ".ledger" / "teacher.sqlite") as ledger:
        batches = ledger.batches()
    assert [b["batch_id"] for b in batches] == ["batch_000001", "batch_000002", "batch_000003", "batch_000004"]
    assert {b["state"] for b in batches} == {"done"}
    assert_no_secret(out, *[b.decode() for b in fake.uploaded_bytes], capfd.readouterr().err)


BATCH_CLIENT = """
import sys
from pathlib import Path
from distillflow.config import TeacherConfig
from distillflow.storage.ledger import Ledger
from distillflow.tasks.teacher import answer_requests, build_messages
from distillflow.tasks.teacher.choose import make_teacher

base_url, ledger_path, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
config = TeacherConfig(base_url=base_url, model="test-teacher", api_key_env="DISTILL_TEST_KEY", mode="batch",
                       batch={"poll_interval_s": 0.1})
teacher = make_teacher(config)
answer_requests(teacher, Ledger(ledger_path), [build_messages(p, None) for p in prompts])
print("finished")
"""


def test_a_killed_batch_run_resumes_the_same_batch_and_pays_nothing_twice(port, tmp_path):
    prompts = PROMPTS[:6]
    ledger_path = tmp_path / "out" / ".ledger" / "teacher.sqlite"
    fake = FaultyOpenAIServer(api_key=API_KEY, batch_latency_s=4.0)
    with ServerThread(fake, port) as server:
        process = subprocess.Popen(
            [sys.executable, "-c", BATCH_CLIENT, server.base_url, str(ledger_path), *prompts],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and fake.batches_created == 0:
                time.sleep(0.05)
            time.sleep(0.5)  # the batch id reaches the ledger before the first poll
            process.send_signal(signal.SIGKILL)
            output, errors = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert b"finished" not in output, errors
        assert fake.batches_created == 1 and fake.batches["batch_000001"]["status"] != "completed"
        with Ledger(ledger_path) as ledger:
            assert [(b["batch_id"], b["state"]) for b in ledger.batches()] == [("batch_000001", "submitted")]
        on_disk = list((ledger_path.parent / "batches").glob("*.jsonl"))
        assert len(on_disk) == 1 and len(on_disk[0].read_bytes().splitlines()) == len(prompts)
        assert_no_secret(on_disk[0], errors.decode())

        teacher = teacher_for(TeacherConfig(base_url=server.base_url, model="test-teacher",
                                              api_key_env="DISTILL_TEST_KEY", mode="batch",
                                              batch={"poll_interval_s": 0.1}))
        with Ledger(ledger_path) as ledger:
            answers = answer_requests(teacher, ledger, [build_messages(p, None) for p in prompts])
            assert [b["state"] for b in ledger.batches()] == ["done"]
    assert [a.content for a, _ in answers] == [expected_answer(p) for p in prompts]
    assert fake.batches_created == 1 and fake.files_uploaded == 1  # polled, not created again
    assert teacher.stats.requests_sent == 0
    assert set(fake.answered.values()) == {1} and len(fake.answered) == len(prompts)
    assert not on_disk[0].exists()  # the input file goes once its batch is collected
    assert_no_secret(ledger_path.parent)


def test_an_upload_whose_batch_id_was_not_recorded_is_found_again(port, tmp_path):
    """A run stopped between batches.create and recording its id: the rerun finds the
    batch by its input file in batches.list instead of creating (and paying) another."""
    import openai

    prompts = PROMPTS[:3]
    fake = FaultyOpenAIServer(api_key=API_KEY, batch_latency_s=0.2)
    with ServerThread(fake, port) as server:
        config = TeacherConfig(base_url=server.base_url, model="test-teacher", api_key_env="DISTILL_TEST_KEY",
                               mode="batch", batch={"poll_interval_s": 0.05})
        teacher = teacher_for(config)
        messages = [build_messages(p, None) for p in prompts]
        keys = [request_key(m, "test-teacher", teacher_params_for_key(config))
                for m in messages]
        lines = b"".join(
            json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "test-teacher", "messages": m, **teacher.request_params()}}).encode() + b"\n"
            for k, m in zip(keys, messages)
        )
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY)
        uploaded = client.files.create(file=("in.jsonl", lines), purpose="batch")
        with Ledger(tmp_path / "ledger.sqlite") as ledger:
            ledger.record_upload(uploaded.id, keys)
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
            answers = answer_requests(teacher, ledger, messages)
    assert [a.content for a, _ in answers] == [expected_answer(p) for p in prompts]
    assert fake.batches_created == 1 and set(fake.answered.values()) == {1}


# -- adaptive rate limits ---------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_rate_limit_headers_slow_every_worker_before_the_api_refuses(port, adaptive):
    # The API allows a burst of 6 and 12 requests a second; the configured limit (1,200 a
    # minute) is wrong for this account, as a fixed limit often is.
    fake = FaultyOpenAIServer(api_key="k", latency_s=0.01, rate_limit_requests=(6, 0.5))
    prompts = PROMPTS[:24]
    with ServerThread(fake, port) as server:
        teacher = OpenAITeacher(
            TeacherConfig(base_url=server.base_url, model="test-teacher", api_key_env=None, max_concurrency=6,
                          max_retries=20, requests_per_minute=1200, adaptive_rate_limit=adaptive),
            api_key="k",
        )
        answers = teacher.answer_sync([build_messages(p, None) for p in prompts])
        teacher.close()
    assert [a.content for a in answers] == [expected_answer(p) for p in prompts]
    if adaptive:
        assert fake.rate_limited == 0
    else:
        assert fake.rate_limited >= 5, fake.rate_limited

"""Teacher logit capture: alignment with a direct forward pass, resume, in place, vLLM parsing, flow."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from distillflow.storage.manifest import read_manifest, write_manifest
from distillflow.storage.parquet import REJECT_SCHEMA, ShardWriter, accepted_schema, file_sha256, read_table
from distillflow.storage.topk import MAX_LOGPROB_ERROR, decode_topk

K = 5
ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("Sum 17 and 25.", "17 + 25 = 42."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules; blue light scatters most."),
    ("Translate 'good morning' to Spanish.", "Buenos días."),
]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from distillflow.training.scratch import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-teacher")
    build_tiny_llama(path, hidden_size=64, num_heads=2, num_layers=2, vocab_size=320, seed=1)
    return path


def write_dataset(root: Path, rows=ROWS, rows_per_shard: int = 3) -> Path:
    """A finished dataset: data/ in two shards, one reject, manifest last."""
    with ShardWriter(root / "data", accepted_schema(), rows_per_shard=rows_per_shard, root=root) as writer:
        writer.write(
            {"id": f"id-{index}", "prompt": prompt, "response": response, "strategy": "seed"}
            for index, (prompt, response) in enumerate(rows)
        )
    with ShardWriter(root / "rejects", REJECT_SCHEMA, root=root) as rejects:
        rejects.write([{"id": "r", "prompt": "p", "strategy": "seed", "reason": "empty"}])
    shards = {"data": [s.to_dict() for s in writer.shards], "rejects": [s.to_dict() for s in rejects.shards]}
    write_manifest(root, {"name": "tiny", "shards": shards})
    return root


def settings_for(teacher: Path, input_dir: Path, output_dir: Path, **overrides):
    from distillflow.tasks.capture.logits import CaptureSettings

    values = dict(
        source="local", model=str(teacher), tokenizer=str(teacher), k=K, input_dir=str(input_dir),
        output_dir=str(output_dir), system_prompt=None, max_length=64, batch_size=2,
        rows_per_read=2, device="cpu", base_url=None, api_key_env=None, max_concurrency=2,
        timeout_s=10.0, max_retries=0,
    )
    return CaptureSettings(**(values | overrides))


@functools.lru_cache(maxsize=2)
def reference_model(teacher: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    return tokenizer, AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()


def direct_topk(teacher: Path, prompt: str, response: str, k: int, max_length: int = 64):
    """Reference: one unpadded forward pass per example, top-k at each supervised token."""
    import torch

    from distillflow.training.data import encode_example

    tokenizer, model = reference_model(teacher)
    example = encode_example(tokenizer, prompt, response, max_length=max_length)
    labels = np.asarray(example["labels"])
    targets = np.flatnonzero(labels != -100)
    with torch.inference_mode():
        logits = model(torch.tensor([example["input_ids"]])).logits[0]  # (L, V)
    logprobs = torch.log_softmax(logits[targets - 1], dim=-1)  # (T, V)
    values, ids = torch.topk(logprobs, k, dim=-1)
    return ids.numpy(), values.numpy()


def blobs_of(dataset: Path) -> list[bytes]:
    return read_table(dataset / "data").column("teacher_topk").to_pylist()


def test_local_capture_matches_a_direct_forward_pass(tiny_teacher, tmp_path):
    from distillflow.tasks.capture.logits import capture_dataset

    source = write_dataset(tmp_path / "in")
    out = tmp_path / "out"
    summary = capture_dataset(settings_for(tiny_teacher, source, out))

    table = read_table(out / "data")
    assert table.column_names[:3] == ["id", "prompt", "response"]
    assert set(table.column("teacher_topk_k").to_pylist()) == {K}
    assert set(table.column("teacher_topk_model").to_pylist()) == {str(tiny_teacher)}
    for (prompt, response), blob in zip(ROWS, table.column("teacher_topk").to_pylist()):
        ids, logprobs = decode_topk(blob)
        expected_ids, expected_logprobs = direct_topk(tiny_teacher, prompt, response, K)
        assert ids.shape == (len(expected_ids), K)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(logprobs, expected_logprobs, atol=MAX_LOGPROB_ERROR + 1e-5, rtol=0)

    manifest = read_manifest(out)
    assert manifest["capture"] == summary
    assert summary["rows"] == len(ROWS) and summary["k"] == K and summary["shards_captured"] == 2
    assert summary["positions"] == sum(len(decode_topk(b)[0]) for b in blobs_of(out))
    assert summary["blob_bytes_per_token"] <= 120
    for shard in manifest["shards"]["data"]:
        assert file_sha256(out / shard["path"]) == shard["sha256"]
    assert (out / "rejects" / "part-00000.parquet").is_file()
    assert "teacher_topk" not in pq.read_schema(source / "data" / "part-00000.parquet").names


def test_rerun_skips_captured_shards_and_a_new_k_recaptures(tiny_teacher, tmp_path):
    from distillflow.tasks.capture.logits import capture_dataset

    source = write_dataset(tmp_path / "in")
    out = tmp_path / "out"
    settings = settings_for(tiny_teacher, source, out)
    first = capture_dataset(settings)
    digests = {path.name: file_sha256(path) for path in (out / "data").glob("*.parquet")}

    again = capture_dataset(settings)
    assert again["shards_skipped"] == 2 and again["shards_captured"] == 0
    assert again["positions"] == first["positions"]
    assert {path.name: file_sha256(path) for path in (out / "data").glob("*.parquet")} == digests

    bigger = capture_dataset(dataclasses.replace(settings, k=K + 2))
    assert bigger["shards_captured"] == 2
    assert decode_topk(blobs_of(out)[0])[0].shape[1] == K + 2


def test_in_place_capture_resumes_after_a_crash(tiny_teacher, tmp_path, monkeypatch):
    import distillflow.tasks.capture.logits as capture
    dataset = write_dataset(tmp_path / "ds")
    settings = settings_for(tiny_teacher, dataset, dataset)
    real_capture_shard = capture.capture_shard

    def crash_on_second_shard(in_path, settings):
        if in_path.name == "part-00001.parquet":
            raise RuntimeError("simulated crash")
        return real_capture_shard(in_path, settings)

    monkeypatch.setattr(capture, "capture_shard", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture.capture_dataset(settings)
    assert not (dataset / "manifest.json").exists()  # incomplete, and says so
    assert (dataset / capture.PRE_CAPTURE_MANIFEST).is_file()

    monkeypatch.setattr(capture, "capture_shard", real_capture_shard)
    summary = capture.capture_dataset(settings)
    assert summary["shards_skipped"] == 1 and summary["shards_captured"] == 1
    assert not (dataset / capture.PRE_CAPTURE_MANIFEST).exists()
    manifest = read_manifest(dataset)
    assert manifest["name"] == "tiny" and manifest["capture"]["rows"] == len(ROWS)
    assert [len(blob) > 0 for blob in blobs_of(dataset)] == [True] * len(ROWS)


def vllm_prompt_logprobs(teacher: Path, input_ids: list[int], k: int) -> list[dict | None]:
    """What vLLM returns as `prompt_logprobs`: entry i predicts token i; top-k plus the
    actual token (which may rank below k); JSON turns the token-id keys into strings."""
    import torch

    _, model = reference_model(teacher)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([input_ids])).logits[0], dim=-1)
    entries: list[dict | None] = [None]
    for index in range(1, len(input_ids)):
        row = logprobs[index - 1]
        ranks = torch.argsort(row, descending=True)
        keep = {int(token) for token in ranks[:k]} | {input_ids[index]}
        rank_of = {int(token): rank + 1 for rank, token in enumerate(ranks.tolist())}
        entries.append(
            {str(token): {"logprob": float(row[token]), "rank": rank_of[token], "decoded_token": f"token_id:{token}"}
             for token in keep}
        )
    return entries


def test_vllm_scorer_reads_prompt_logprobs_like_the_local_scorer(tiny_teacher, tmp_path):
    from openai.types import Completion

    from distillflow.tasks.capture.logits import VllmScorer, encode_rows, make_scorer

    settings = settings_for(tiny_teacher, tmp_path, tmp_path, source="vllm", base_url="http://unused/v1")
    scorer = VllmScorer(settings)
    requests = []

    def create(**request):
        requests.append(request)
        choices = [
            {"index": index, "text": "", "finish_reason": "length",
             "prompt_logprobs": vllm_prompt_logprobs(tiny_teacher, ids, request["extra_body"]["prompt_logprobs"])}
            for index, ids in enumerate(request["prompt"])
        ]
        return Completion.model_validate(
            {"id": "c", "object": "text_completion", "created": 0, "model": request["model"], "choices": choices}
        )

    scorer.client.completions.create = create
    encoded = encode_rows(settings, [p for p, _ in ROWS], [r for _, r in ROWS])
    sequences, targets = [ids for ids, _ in encoded], [t for _, t in encoded]
    from_vllm = scorer.topk(sequences, targets, K, batch_size=2)
    local = make_scorer(dataclasses.replace(settings, source="local", device="cpu"))
    from_local = local.topk(sequences, targets, K, batch_size=3)

    assert len(requests) == 3 and requests[0]["extra_body"]["prompt_logprobs"] == K
    assert requests[0]["prompt"] == sequences[:2]  # token ids, not text
    for (ids, logprobs), (local_ids, local_logprobs) in zip(from_vllm, from_local):
        np.testing.assert_array_equal(ids, local_ids)
        np.testing.assert_allclose(logprobs, local_logprobs, atol=1e-5)


def test_prompt_logprobs_parser_keeps_top_k_and_drops_the_extra_prompt_token():
    from distillflow.tasks.capture.logits import prompt_logprobs_to_topk

    entries = [
        None,
        {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -9.0, "rank": 40}},
    ]
    ids, logprobs = prompt_logprobs_to_topk(entries, np.array([1]), 2)
    np.testing.assert_array_equal(ids, [[7, 3]])
    np.testing.assert_allclose(logprobs, [[-0.1, -2.0]])
    with pytest.raises(ValueError, match="--max-logprobs"):
        prompt_logprobs_to_topk(entries, np.array([1]), 4)


def config_file(tmp_path: Path, teacher: Path, dataset: Path, **capture) -> Path:
    data = {
        "name": "tiny",
        "output_dir": str(dataset),
        "seeds": [{"path": str(tmp_path / "unused.jsonl")}],
        "teacher": {"backend": "local", "model": str(teacher)},
        "capture": {"k": K, "max_length": 64, "batch_size": 4, **capture},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_config_defaults_and_errors(tiny_teacher, tmp_path):
    from distillflow.config import ConfigError, load_config
    from distillflow.tasks.capture.logits import check_capture_input, resolve_capture_settings

    config = load_config(config_file(tmp_path, tiny_teacher, tmp_path / "ds"), check_files=False)
    settings = resolve_capture_settings(config)
    assert settings.model == settings.tokenizer == str(tiny_teacher)
    assert settings.in_place and settings.input_dir == str(tmp_path / "ds")
    with pytest.raises(ConfigError, match="no .parquet shards"):
        check_capture_input(settings)
    write_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="not a finished distillflow dataset"):
        check_capture_input(settings)

    with pytest.raises(ConfigError, match="capture.tokenizer is required"):
        load_config(config_file(tmp_path, tiny_teacher, tmp_path, source="vllm", model="served"), check_files=False)
    with pytest.raises(ConfigError, match="no `capture:` section"):
        resolve_capture_settings(config.model_copy(update={"capture": None}))
    with pytest.raises(ConfigError, match="capture.bogus: unknown key"):
        load_config(config_file(tmp_path, tiny_teacher, tmp_path, bogus=1), check_files=False)


def test_capture_logits_flow_end_to_end(prefect_harness, tiny_teacher, tmp_path):
    from distillflow.flows.capture_logits import capture_logits_command

    dataset = write_dataset(tmp_path / "ds")
    summary = capture_logits_command(config_file(tmp_path, tiny_teacher, dataset))
    assert summary["rows"] == len(ROWS) and summary["shards_captured"] == 2
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["capture"]["max_abs_logprob_error_nats"] == MAX_LOGPROB_ERROR


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def vllm_server(tiny_teacher, tmp_path_factory):
    """A vLLM (CPU, float32) OpenAI-compatible server for the tiny teacher: its /v1 URL."""
    import os
    import subprocess
    import urllib.request

    from tests.conftest import free_port

    if not VLLM_PYTHON.is_file():
        pytest.skip("no .venv-vllm (create it with scripts/setup_vllm_venv.sh)")
    port = free_port()
    scratch = tmp_path_factory.mktemp("vllm")
    env = {
        **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(scratch / "cache"), "TMPDIR": str(scratch),
    }
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_teacher),
         "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
         "--max-num-batched-tokens", "32768", "--max-logprobs", "20"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("vLLM did not start:\n" + (scratch / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.vllm
def test_vllm_capture_matches_local_capture(vllm_server, tiny_teacher, tmp_path):
    from distillflow.tasks.capture.logits import capture_dataset

    source = write_dataset(tmp_path / "in")
    local, served = tmp_path / "local", tmp_path / "served"
    capture_dataset(settings_for(tiny_teacher, source, local))
    summary = capture_dataset(settings_for(
        tiny_teacher, source, served, source="vllm", model="tiny-teacher", base_url=vllm_server, k=K,
        timeout_s=180.0, max_concurrency=1,  # the first requests on a busy CPU are slow
    ))
    assert summary["source"] == "vllm" and summary["rows"] == len(ROWS)
    for blob, local_blob in zip(blobs_of(served), blobs_of(local)):
        ids, logprobs = decode_topk(blob)
        local_ids, local_logprobs = decode_topk(local_blob)
        np.testing.assert_array_equal(ids, local_ids)
        np.testing.assert_allclose(logprobs, local_logprobs, atol=1e-4)

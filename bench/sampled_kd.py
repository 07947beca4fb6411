"""Top-k vs sampled sparse KD at equal bytes per token, on a small version of the demo task.

    OMP_NUM_THREADS=1 python bench/sampled_kd.py                         # 1,000 prompts, 300 steps, 2 seeds
    OMP_NUM_THREADS=1 python bench/sampled_kd.py --prompts 100 --steps 30 --seeds 0   # a smoke run

1. The demo teacher (distillflow/assets/demo-teacher, copied into the work dir first, so a
   teacher replaced mid-run cannot mix two models) answers the first `--prompts` questions of
   prompts/seeds/skills.jsonl greedily; the rows are written as a finished dataset.
2. `distill capture-logits`'s capture (`tasks.capture.logits.capture_dataset`) stores, at the
   same k, the teacher's top-k (`capture.method: topk`) and k draws from its distribution
   (`capture.method: sampled`): the same codec, so the same bytes per token.
3. For each seed, one student per capture: the demo's derived student (2 layers, hidden 96),
   `kd_topk` at T = 1 (sampled captures allow no other), `--alpha` (default 1: pure KD, the
   student learns from the stored targets alone), same steps, data order and init.
4. Each student answers prompts/seeds/skills_eval.jsonl greedily: accuracy (the eval set's
   checks) and calibration, the expected calibration error (ECE, 10 equal-width bins) of
   the student's probability of its first answer token against whether its answer is right.

Writes `sampled_kd.json` and `sampled_kd.md` in the work dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_TEACHER = ROOT / "distillflow" / "assets" / "demo-teacher"
TRAIN_SEEDS = ROOT / "prompts" / "seeds" / "skills.jsonl"
EVAL_SEEDS = ROOT / "prompts" / "seeds" / "skills_eval.jsonl"
METHODS = ("topk", "sampled")
ECE_BINS = 10
LEARNING_RATE = 3.0e-3  # docs/training.md's table's, not configs/demo.yaml's


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# -- generation -----------------------------------------------------------------------------


@torch.inference_mode()
def greedy_answers(model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 64):
    """(answers, first-token probabilities) of greedy decoding with the model's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    end_id = tokenizer.eos_token_id
    answers, first_probs = [], []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
            pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
        first = torch.softmax(output.scores[0].float(), dim=-1).amax(dim=-1)  # (B,) p of the greedy first token
        new_tokens = output.sequences[:, batch["input_ids"].shape[1] :]  # (B, ≤ max_new_tokens)
        for row in new_tokens.tolist():
            row = row[: row.index(end_id)] if end_id in row else row
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
        first_probs += first.tolist()
    return answers, first_probs


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum_b (n_b / n) |accuracy_b - mean confidence_b| over equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)  # (n,) bin of each answer
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def score(model_dir: Path, eval_rows: list[dict], max_new_tokens: int) -> dict:
    from distillflow.tasks.evaluation.checks import is_correct

    answers, confidence = greedy_answers(model_dir, [row["prompt"] for row in eval_rows], max_new_tokens)
    correct = np.array([is_correct(row.get("check") or "exact", a, row["reference"]) for row, a in zip(eval_rows, answers)])
    confidence = np.asarray(confidence)
    return {
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(confidence, correct.astype(float)),
        "mean_confidence": float(confidence.mean()),
    }


# -- data -----------------------------------------------------------------------------------


def write_teacher_dataset(teacher: Path, rows: list[dict], out: Path, max_new_tokens: int) -> int:
    """The teacher's greedy answers to `rows` as a finished dataset (data/, manifest last)."""
    from distillflow.records import content_id
    from distillflow.storage.manifest import write_manifest
    from distillflow.storage.parquet import ShardWriter, accepted_schema

    if (out / "manifest.json").is_file():
        return -1
    answers, _ = greedy_answers(teacher, [row["prompt"] for row in rows], max_new_tokens)
    kept = [(row["prompt"], answer) for row, answer in zip(rows, answers) if answer.strip()]
    with ShardWriter(out / "data", accepted_schema(), root=out) as writer:
        writer.write({"id": content_id(p), "prompt": p, "response": a, "strategy": "seed"} for p, a in kept)
    write_manifest(out, {"name": "sampled-kd-bench", "shards": {"data": [s.to_dict() for s in writer.shards]}})
    return len(kept)


def capture(teacher: Path, dataset: Path, out: Path, method: str, k: int, max_length: int) -> dict:
    from distillflow.tasks.capture.logits import CaptureSettings, capture_dataset

    settings = CaptureSettings(
        source="local", model=str(teacher), tokenizer=str(teacher), k=k, input_dir=str(dataset),
        output_dir=str(out), system_prompt=None, max_length=max_length, batch_size=64,
        rows_per_read=512, device="cpu", base_url=None, api_key_env=None, max_concurrency=1,
        timeout_s=60.0, max_retries=0, method=method,
    )
    return capture_dataset(settings)


def distinct_per_position(dataset: Path) -> float:
    """Mean number of slots with weight > 0 per position (sampled: distinct drawn tokens;
    weight-0 fillers decode 64 nats below the largest weight)."""
    from distillflow.storage.parquet import read_table
    from distillflow.storage.topk import decode_topk

    counts = []
    for blob in read_table(dataset / "data", columns=["teacher_topk"]).column("teacher_topk").to_pylist():
        _, logprobs = decode_topk(blob)
        counts += (logprobs > logprobs[:, :1] - 60).sum(-1).tolist()
    return float(np.mean(counts))


# -- training -------------------------------------------------------------------------------


def train_student(workdir: Path, teacher: Path, dataset: Path, name: str, seed: int, args) -> Path:
    """One student by `python -m distillflow.training.train` (what `distill train` runs)."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["training"]
    training = {
        "dataset_dir": str(dataset), "output_dir": str(workdir / "students" / name), "teacher": str(teacher),
        "derive_student": demo["derive_student"], "objective": "kd_topk", "temperature": 1.0,
        "alpha": args.alpha, "max_length": demo["max_length"], "packing": demo["packing"],
        "micro_batch_size": demo["micro_batch_size"], "learning_rate": LEARNING_RATE,
        "warmup_steps": min(demo["warmup_steps"], args.steps // 10), "lr_schedule": demo["lr_schedule"],
        "max_steps": args.steps, "log_every": max(1, args.steps // 5), "checkpoint_every": 0,
        "deepspeed_config": str(ROOT / demo["deepspeed_config"]), "seed": seed,
    }
    path = workdir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"training": training}, sort_keys=False), encoding="utf-8")
    final = workdir / "students" / name / "final"
    if (final / "config.json").is_file():  # trained by an earlier run of the bench
        return final
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.training.train", "--config", str(path)],
        cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return final


# -- report ---------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(report: dict) -> str:
    lines = [
        "| capture | bytes/token (raw / zstd) | tokens with weight > 0 per position | accuracy | ECE | mean confidence |",
        "|---|---|---|---|---|---|",
    ]
    teacher = report["teacher"]
    lines.append(f"| teacher (reference) | – | – | {teacher['accuracy']:.3f} | {teacher['ece']:.3f} | "
                 f"{teacher['mean_confidence']:.3f} |")
    for method in METHODS:
        entry = report["methods"][method]
        runs = entry["seeds"]
        lines.append(
            f"| {method} k={report['k']} | {entry['blob_bytes_per_token']} / {entry['stored_bytes_per_token']} | "
            f"{entry['slots_used']:.2f} | {mean_sd([r['accuracy'] for r in runs])} | "
            f"{mean_sd([r['ece'] for r in runs])} | {mean_sd([r['mean_confidence'] for r in runs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-sampled-kd")
    parser.add_argument("--prompts", type=int, default=1000, help="training questions (first N of skills.jsonl)")
    parser.add_argument("--eval", type=int, default=0, help="eval questions (0: all of skills_eval.jsonl)")
    parser.add_argument("--k", type=int, default=8, help="slots per position, both captures (the demo's k)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=1.0, help="KD weight (1 - alpha on cross-entropy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    started = time.perf_counter()
    workdir = args.workdir
    teacher = workdir / "teacher"
    if not (teacher / "config.json").is_file():  # a snapshot: the shipped directory may be replaced
        shutil.copytree(DEMO_TEACHER, teacher, dirs_exist_ok=True)
    rows = write_teacher_dataset(
        teacher, read_jsonl(TRAIN_SEEDS, args.prompts), workdir / "dataset", args.max_new_tokens
    )
    print(f"dataset: {rows if rows >= 0 else 'existing'} teacher answers", flush=True)
    eval_rows = read_jsonl(EVAL_SEEDS, args.eval or None)
    report: dict = {"k": args.k, "prompts": args.prompts, "eval_questions": len(eval_rows), "steps": args.steps,
                    "alpha": args.alpha, "seeds": args.seeds, "methods": {}}
    card = teacher / "demo_teacher.json"
    report["teacher_version"] = json.loads(card.read_text())["version_key"] if card.is_file() else None
    report["teacher"] = score(teacher, eval_rows, args.max_new_tokens)
    max_length = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["training"]["max_length"]
    for method in METHODS:
        dataset = workdir / f"dataset-{method}"
        summary = capture(teacher, workdir / "dataset", dataset, method, args.k, max_length)
        entry = {
            "blob_bytes_per_token": summary["blob_bytes_per_token"],
            "stored_bytes_per_token": summary["stored_bytes_per_token"],
            "slots_used": distinct_per_position(dataset),
            "seeds": [],
        }
        for seed in args.seeds:
            final = train_student(workdir, teacher, dataset, f"{method}-seed{seed}", seed, args)
            entry["seeds"].append({"seed": seed, **score(final, eval_rows, args.max_new_tokens)})
        report["methods"][method] = entry
    report["seconds"] = round(time.perf_counter() - started)
    (workdir / "sampled_kd.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    markdown = table(report)
    (workdir / "sampled_kd.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"({len(args.seeds)} seed(s), {args.steps} steps, {args.prompts} prompts, {len(eval_rows)} eval "
          f"questions, alpha {args.alpha}, T = 1; teacher {report['teacher_version']}; {report['seconds']} s)")


if __name__ == "__main__":
    main()

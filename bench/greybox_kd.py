"""Grey-box KD (kd_greybox) vs sft on the demo task, with a student whose tokenizer differs.

    OMP_NUM_THREADS=1 python bench/greybox_kd.py                                  # 1,000 prompts, 1,200 steps, 5 seeds
    OMP_NUM_THREADS=1 python bench/greybox_kd.py --prompts 200 --steps 40 --seeds 0 1 --eval 100   # a smoke run

1. The demo teacher (distillflow/assets/demo-teacher, copied into the work dir first) answers
   the first `--prompts` questions of prompts/seeds/skills.jsonl greedily, and every answer
   token keeps the teacher's top-`--k` alternatives and logprobs in the `top_logprobs`
   column, as a build with `teacher.generation.top_logprobs: k` stores them from a local
   teacher (vocabulary entries). The teacher's tokenizer is one token per character.
2. The student's tokenizer is a byte-level BPE with merges (`--student-vocab` tokens),
   trained in process with `tokenizers` on the dataset's questions and answers; the student is
   the demo student's shape (2 layers, hidden 96, fresh weights) over that vocabulary.
3. For each seed, two students with the same init, data order and steps, at configs/demo.yaml's
   settings (alpha, packing, schedule) with T = 1 and learning rate 3e-3 (`TEMPERATURE`,
   `LEARNING_RATE`: the table's settings): `sft` on the teacher's text and
   `kd_greybox` on the stored logprobs, aligned to the student's tokens.
4. Each answers prompts/seeds/skills_eval.jsonl greedily: clean accuracy (the eval set's
   checks), mean and 95 % CI over seeds (Student's t), and the paired difference
   kd_greybox − sft seed by seed with its CI; aligned-position coverage; ms per optimizer
   step of the runs (metrics.jsonl; exposed to the machine's load) and, the figure to
   compare, the median of alternating micro-steps of both objectives on one batch in one
   process; the alignment runs once before the first step and is timed apart.

Writes `greybox_kd.json` and `greybox_kd.md` in the work dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kd_vs_sft import mean_ci  # noqa: E402
from bench.sampled_kd import DEMO_TEACHER, EVAL_SEEDS, TRAIN_SEEDS, read_jsonl, score  # noqa: E402
from distillflow.tasks.train.student import run_streaming  # noqa: E402
from distillflow.training.launch import build_launch_command, launch_env  # noqa: E402

OBJECTIVES = ("sft", "kd_greybox")
# The settings of docs/training.md's table, which configs/demo.yaml's need not share.
TEMPERATURE = 1.0
LEARNING_RATE = 3.0e-3


@torch.inference_mode()
def write_teacher_dataset(teacher: Path, rows: list[dict], out: Path, k: int, max_new_tokens: int) -> int:
    """Greedy teacher answers with their per-token top-k (data/, manifest last); -1 when present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillflow.records import content_id
    from distillflow.storage.manifest import write_manifest
    from distillflow.storage.parquet import ShardWriter, accepted_schema

    if (out / "manifest.json").is_file():
        return -1
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    end_id = tokenizer.eos_token_id
    kept = []
    for start in range(0, len(rows), 64):
        prompts = [row["prompt"] for row in rows[start : start + 64]]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
            pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        logprobs = torch.log_softmax(torch.stack(output.scores, dim=1).float(), dim=-1)  # (B, T, V)
        top = logprobs.topk(k, dim=-1)
        new_tokens = output.sequences[:, batch["input_ids"].shape[1] :]
        for row, prompt in enumerate(prompts):
            ids = new_tokens[row].tolist()
            ids = ids[: ids.index(end_id) + 1] if end_id in ids else ids  # the eos entry too, as a local teacher stores it
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            if not answer.strip():
                continue
            entries = [
                {
                    "token": tokenizer.convert_ids_to_tokens(token_id),
                    "logprob": float(logprobs[row, step, token_id]),
                    "top": [
                        {"token": tokenizer.convert_ids_to_tokens(alt), "logprob": float(value)}
                        for alt, value in zip(top.indices[row, step].tolist(), top.values[row, step].tolist())
                    ],
                }
                for step, token_id in enumerate(ids)
            ]
            kept.append((prompt, answer, entries))
    with ShardWriter(out / "data", accepted_schema(with_top_logprobs=True), root=out) as writer:
        writer.write(
            {"id": content_id(p), "prompt": p, "response": a, "strategy": "seed", "top_logprobs": e} for p, a, e in kept
        )
    write_manifest(out, {"name": "greybox-kd-bench", "shards": {"data": [s.to_dict() for s in writer.shards]}})
    return len(kept)


def student_init(workdir: Path, dataset: Path, vocab: int, seed: int) -> Path:
    """The demo student's shape over a BPE vocabulary trained on the dataset's text."""
    from distillflow.flows.demo import own_vocabulary_init

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["training"]["derive_student"]
    return own_vocabulary_init(demo, dataset, workdir / "students" / f"init-seed{seed}", seed, vocab)


def train_student(workdir: Path, dataset: Path, init: Path, objective: str, seed: int, steps: int) -> Path:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["training"]
    name = f"{objective}-seed{seed}"
    training = {
        "dataset_dir": str(dataset), "output_dir": str(workdir / "students" / name), "student": str(init),
        "objective": objective, "temperature": TEMPERATURE, "alpha": demo["alpha"],
        "max_length": demo["max_length"], "packing": demo["packing"], "micro_batch_size": demo["micro_batch_size"],
        "learning_rate": LEARNING_RATE, "warmup_steps": min(demo["warmup_steps"], steps // 10),
        "lr_schedule": demo["lr_schedule"], "max_steps": steps, "log_every": max(1, steps // 5),
        "checkpoint_every": 0, "deepspeed_config": str(ROOT / demo["deepspeed_config"]), "seed": seed,
    }  # fmt: skip
    path = workdir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"training": training}, sort_keys=False), encoding="utf-8")
    run = workdir / "students" / name
    if (run / "final" / "config.json").is_file():  # trained by an earlier run of the bench
        return run
    started = time.perf_counter()
    # The launcher `distill train` uses: a failure stops the bench with the run's last lines.
    run_streaming(build_launch_command(path), on_line=lambda line: None, env=launch_env(), cwd=ROOT, timeout_s=3600)
    print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def step_cost(workdir: Path, dataset: Path, init: Path, repeats: int) -> dict:
    """Median ms of one micro-step (forward + backward + AdamW) of each objective on the same
    batch of the demo's shape, alternating the objectives; and the alignment's one-off seconds."""
    from distillflow.training.config import TrainingConfig
    from distillflow.training.data import collate, pack_examples, tokenize_dataset
    from distillflow.training.greybox import attach_greybox
    from distillflow.training.model import DistillationModel, load_causal_lm
    from distillflow.training.vocabulary import load_tokenizer

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["training"]
    tokenizer = load_tokenizer(init)
    examples = tokenize_dataset(dataset, tokenizer, None, demo["max_length"], workdir / "cost-cache")
    started = time.perf_counter()
    attach_greybox(examples, dataset, tokenizer)
    align_s = time.perf_counter() - started
    batch = collate(pack_examples(examples, demo["max_length"])[: demo["micro_batch_size"]], tokenizer.pad_token_id)
    models, optimizers, times = {}, {}, {objective: [] for objective in OBJECTIVES}
    for objective in OBJECTIVES:
        config = TrainingConfig(
            dataset_dir=dataset, output_dir=workdir / "cost", student=init, objective=objective,
            temperature=TEMPERATURE, alpha=demo["alpha"], max_length=demo["max_length"],
        )  # fmt: skip
        torch.manual_seed(0)
        models[objective] = DistillationModel(load_causal_lm(init), config, len(tokenizer))
        optimizers[objective] = torch.optim.AdamW(models[objective].parameters(), lr=LEARNING_RATE)
    for repeat in range(repeats + 2):  # the first two are warm-up
        for objective in OBJECTIVES:
            started = time.perf_counter()
            sums = models[objective](batch)
            (sums[0] / batch.num_supervised).backward()
            optimizers[objective].step()
            optimizers[objective].zero_grad()
            if repeat >= 2:
                times[objective].append(1000 * (time.perf_counter() - started))
    median = {objective: statistics.median(values) for objective, values in times.items()}
    return {
        "micro_step_ms": median, "ratio": median["kd_greybox"] / median["sft"], "repeats": repeats,
        "align_s": align_s, "examples": len(examples), "batch_tokens": int(batch.input_ids.numel()),
    }  # fmt: skip


def ms_per_step(run: Path) -> float:
    """Mean optimizer-step time after the first (warm-up) step, from metrics.jsonl."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    if len(steps) < 2:
        return 1000 * steps[-1]["elapsed_s"]
    return 1000 * (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (len(steps) - 1)


def teacher_snapshot(workdir: Path) -> Path:
    """The demo teacher copied into the work dir once: a shipped directory replaced mid-run cannot mix two models."""
    teacher = workdir / "teacher"
    if not (teacher / "config.json").is_file():
        shutil.copytree(DEMO_TEACHER, teacher, dirs_exist_ok=True)
    return teacher


def table(report: dict) -> str:
    def pct(stat: dict) -> str:
        half = "" if stat["ci95"] is None else f" ± {100 * stat['ci95']:.1f}"
        return f"{100 * stat['mean']:.1f}{half}"

    lines = [
        "| student | clean accuracy (%) | paired Δ vs sft (points) | aligned positions | ms/step (× sft) |",
        "|---|---|---|---|---|",
    ]
    for objective in OBJECTIVES:
        entry = report["objectives"][objective]
        delta = pct(entry["paired_delta"]) if entry.get("paired_delta") else "–"
        coverage = entry.get("coverage")
        covered = f"{100 * coverage['covered_share']:.1f} % (exact {coverage['exact']}, merged {coverage['merged']}, uld {coverage['uld']}, none {coverage['none']})" if coverage else "–"
        lines.append(
            f"| {objective} | {pct(entry['clean'])} | {delta} | {covered} | "
            f"{entry['ms_per_step']:.0f} ({entry['ms_per_step'] / report['objectives']['sft']['ms_per_step']:.2f}×) |"
        )
    lines.append(f"| teacher | {100 * report['teacher']['accuracy']:.1f} | – | – | – |")
    cost = report["cost"]
    lines.append("")
    lines.append(
        f"Cost on one batch of the demo's shape ({cost['batch_tokens']} tokens), median of {cost['repeats']} "
        f"alternating micro-steps: sft {cost['micro_step_ms']['sft']:.0f} ms, kd_greybox "
        f"{cost['micro_step_ms']['kd_greybox']:.0f} ms (**{cost['ratio']:.2f}×**); the alignment of the "
        f"{cost['examples']} examples, once before the first step: {cost['align_s']:.1f} s."
    )
    return "\n".join(lines)


def save_report(workdir: Path, report: dict) -> str:
    """greybox_kd.json and its table as greybox_kd.md in the work dir; returns the table."""
    markdown = table(report)
    for name, text in (("greybox_kd.json", json.dumps(report, indent=2)), ("greybox_kd.md", markdown + "\n")):
        (workdir / name).write_text(text, encoding="utf-8")
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per student (the demo's)")
    parser.add_argument("--prompts", type=int, default=1000, help="training questions (first N of skills.jsonl)")
    parser.add_argument("--k", type=int, default=8, help="alternatives per answer token (an API gives up to 20)")
    parser.add_argument("--student-vocab", type=int, default=400, help="BPE vocabulary of the student")
    parser.add_argument("--eval", type=int, default=0, help="eval questions (0: all of skills_eval.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest greedy answer")
    parser.add_argument("--cost-repeats", type=int, default=30, help="timed micro-steps per objective (alternating)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-greybox-kd")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    started, workdir = time.perf_counter(), args.workdir
    teacher = teacher_snapshot(workdir)
    dataset = workdir / "dataset"
    rows = write_teacher_dataset(teacher, read_jsonl(TRAIN_SEEDS, args.prompts), dataset, args.k, args.max_new_tokens)
    print(f"dataset: {rows if rows >= 0 else 'existing'} teacher answers with top-{args.k} logprobs", flush=True)
    eval_rows = read_jsonl(EVAL_SEEDS, args.eval or None)
    report: dict = {"k": args.k, "prompts": args.prompts, "eval_questions": len(eval_rows), "steps": args.steps,
                    "student_vocab": args.student_vocab, "seeds": args.seeds, "objectives": {}}  # fmt: skip
    report["teacher"] = score(teacher, eval_rows, args.max_new_tokens)
    per_seed: dict[str, dict[int, float]] = {objective: {} for objective in OBJECTIVES}
    entries: dict[str, dict] = {objective: {"seeds": []} for objective in OBJECTIVES}
    for seed in args.seeds:  # objectives interleaved, so a change in machine load hits both alike
        init = student_init(workdir, dataset, args.student_vocab, seed)
        for objective in OBJECTIVES:
            run = train_student(workdir, dataset, init, objective, seed, args.steps)
            accuracy = score(run / "final", eval_rows, args.max_new_tokens)["accuracy"]
            per_seed[objective][seed] = accuracy
            entries[objective]["seeds"].append({"seed": seed, "accuracy": accuracy, "ms_per_step": ms_per_step(run)})
            summary = json.loads((run / "metrics.json").read_text())
            if "greybox_coverage" in summary:
                entries[objective]["coverage"] = summary["greybox_coverage"]
    for objective, entry in entries.items():
        entry["clean"] = mean_ci([s["accuracy"] for s in entry["seeds"]])
        entry["ms_per_step"] = sum(s["ms_per_step"] for s in entry["seeds"]) / len(entry["seeds"])
        report["objectives"][objective] = entry
    first_init = student_init(workdir, dataset, args.student_vocab, args.seeds[0])
    report["cost"] = step_cost(workdir, dataset, first_init, args.cost_repeats)
    deltas = [per_seed["kd_greybox"][seed] - per_seed["sft"][seed] for seed in args.seeds]
    report["objectives"]["kd_greybox"]["paired_delta"] = mean_ci(deltas)
    report["seconds"] = round(time.perf_counter() - started)
    print(save_report(workdir, report))
    print(f"({len(args.seeds)} seed(s), {args.steps} steps, {args.prompts} prompts, {len(eval_rows)} eval questions, "
          f"k = {args.k}, student BPE vocabulary {args.student_vocab}; {report['seconds']} s)")


if __name__ == "__main__":
    main()

"""KD vs SFT on the demo task, honestly: same data, same steps, several seeds, tuned KD.

    python bench/kd_vs_sft.py                      # the demo's settings, 3 seeds
    python bench/kd_vs_sft.py --seeds 0 --steps 50 --quick   # a smoke run

1. The demo dataset (`distill demo`'s build + capture-logits: the demo teacher's answers
   and its top-k logprobs), or `--dataset DIR` of an earlier run.
2. Tuning, on the first seed and a *validation* set (held-out-half questions drawn apart
   from the test set): `kd_topk` at T = 1, 2, 4 (alpha 0.5) and alpha = 1 (T = 2);
   `kd_logits` gets the winner.
3. For each seed: `sft` (teacher text), `kd_topk` and `kd_logits` (tuned), and `reference`
   (the true answers of the same prompts) — the demo's student (2 layers, hidden 96), the
   same steps, learning rate, batch and data order per seed (the kd_topk run of the first
   seed is the tuning run of the winning point).
4. `distill eval` of every student on the test set (prompts/seeds/skills_eval.jsonl), clean
   and under the robustness perturbations; mean ± sd over seeds per objective.

Writes `kd_vs_sft.json` and `kd_vs_sft.md` in the work dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# temperature at alpha 0.5, then alpha at the demo's temperature
GRID = ((1.0, 0.5), (2.0, 0.5), (4.0, 0.5), (2.0, 1.0))


def train_student(config: dict, workdir: Path, name: str, dataset_dir: Path, **training) -> Path:
    """One student trained by `python -m training.train` (the process `distill train` runs)."""
    from distillflow.flows.demo import student_config

    variant = student_config(config, workdir / "students", name, dataset_dir)
    variant["training"].update(training)
    variant["training"]["output_dir"] = str(workdir / "students" / name)
    path = workdir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(variant, sort_keys=False))
    final = workdir / "students" / name / "final"
    if (final / "config.json").is_file():  # finished in an earlier run of the bench
        return final
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.training.train", "--config", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return final


def evaluate(config: dict, workdir: Path, tag: str, models: dict[str, Path], eval_set: Path, robust: bool) -> dict:
    """`distill eval` of `models` on one eval set; returns report.json's per-model entries."""
    from distillflow.flows.evaluate import eval_command

    evaluation = json.loads(json.dumps(config["evaluation"]))
    evaluation["output_dir"] = str(workdir / f"eval-{tag}")
    evaluation["models"] = [{"name": name, "path": str(path)} for name, path in models.items()]
    evaluation["eval_sets"] = [{"name": "test" if tag == "test" else "validation", "path": str(eval_set)}]
    evaluation["speed"] = None  # accuracy only: the demo reports speed
    evaluation.pop("reference_model", None)  # the teacher is not among these models
    evaluation.pop("heldout", None)
    if not robust:
        evaluation.pop("robustness", None)
    run_config = {**config, "evaluation": evaluation}
    run_config.pop("training", None)
    path = workdir / "configs" / f"eval-{tag}.yaml"
    path.write_text(yaml.safe_dump(run_config, sort_keys=False))
    return eval_command(path)


def clean_and_robust(report: dict, name: str) -> tuple[float, float | None]:
    row = next(row for row in report["table"] if row["model"] == name)
    return row["clean_acc"], row["robust_acc"]


def validation_set(workdir: Path, count: int) -> Path:
    """Held-out-half questions drawn apart from the test file (another seed of `distinct`)."""
    from distillflow.prompts.skills import distinct

    test_prompts = {json.loads(line)["prompt"] for line in (ROOT / "prompts/seeds/skills_eval.jsonl").open()}
    rows = [item.record() for item in distinct(count * 2, seed=2, split="eval") if item.prompt not in test_prompts]
    path = workdir / "validation.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))
    return path


def main() -> None:
    from distillflow.flows.capture_logits import capture_logits_command
    from distillflow.flows.demo import DemoBudget, demo_command, write_reference_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "kd-vs-sft")
    parser.add_argument("--dataset", type=Path, default=None, help="A demo run dir with dataset/ (with teacher_topk).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DemoBudget().student_steps)
    parser.add_argument(
        "--kd-logits-seeds", type=int, default=None,
        help="Train kd_logits on only the first N seeds (its in-process teacher forward pass makes "
        "each run about 3x longer on a CPU); default: every seed.",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: a smoke run of the bench itself.")
    args = parser.parse_args()

    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"  # tiny models: one thread per process (see flows/demo.py)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    budget = DemoBudget(num_prompts=200, eval_prompts=20) if args.quick else DemoBudget()
    source = args.dataset.resolve() if args.dataset else workdir / "demo"
    if not (source / "dataset" / "manifest.json").is_file():
        print(f"building the demo dataset in {source}…", flush=True)
        demo_command(source, train_student=False, budget=budget)
    config = yaml.safe_load((source / "demo.yaml").read_text())
    if "teacher_topk" not in _columns(source / "dataset"):
        capture_logits_command(source / "demo.yaml")
    dataset_dir = source / "dataset"
    reference_dir = workdir / "reference-data"
    write_reference_dataset(dataset_dir, Path(config["seeds"][0]["path"]), reference_dir)
    test_set = ROOT / "prompts" / "seeds" / "skills_eval.jsonl"
    validation = validation_set(workdir, 40 if args.quick else 200)

    # -- tuning kd_topk's temperature and alpha on seed 0, validation set --------------------
    grid = list(GRID) if not args.quick else [(2.0, 0.5), (1.0, 1.0)]
    tuned = {}
    for temperature, alpha in grid:
        name = f"tune-kd_topk-T{temperature:g}-a{alpha:g}"
        tuned[name] = train_student(
            config, workdir, name, dataset_dir, objective="kd_topk", temperature=temperature, alpha=alpha,
            max_steps=args.steps, seed=args.seeds[0],
        )  # fmt: skip
    tuning = evaluate(config, workdir, "tuning", tuned, validation, robust=False)
    scores = {name: clean_and_robust(tuning, name)[0] for name in tuned}
    best = max(grid, key=lambda point: scores[f"tune-kd_topk-T{point[0]:g}-a{point[1]:g}"])
    print(f"tuning (validation accuracy): {json.dumps(scores)}; best T={best[0]:g} alpha={best[1]:g}", flush=True)

    # -- each objective, each seed, same data / steps / init ---------------------------------
    runs = {
        "sft": {"objective": "sft"},
        "kd_topk": {"objective": "kd_topk", "temperature": best[0], "alpha": best[1]},
        "kd_logits": {"objective": "kd_logits", "temperature": best[0], "alpha": best[1]},
        "reference": {"objective": "sft"},
    }
    students = {}
    seeds_of = {objective: list(args.seeds) for objective in runs}
    seeds_of["kd_logits"] = list(args.seeds[: args.kd_logits_seeds or len(args.seeds)])
    for seed in args.seeds:
        for objective, settings in runs.items():
            if seed not in seeds_of[objective]:
                continue
            data = reference_dir if objective == "reference" else dataset_dir
            name = f"{objective}-seed{seed}"
            tuned_name = f"tune-kd_topk-T{best[0]:g}-a{best[1]:g}"
            if objective == "kd_topk" and seed == args.seeds[0]:  # the tuning run is this very run
                students[name] = tuned[tuned_name]
                continue
            students[name] = train_student(config, workdir, name, data, max_steps=args.steps, seed=seed, **settings)
    test = evaluate(config, workdir, "test", students, test_set, robust=True)

    table = {}
    for objective in runs:
        pairs = [clean_and_robust(test, f"{objective}-seed{seed}") for seed in seeds_of[objective]]
        clean = [pair[0] for pair in pairs]
        robust = [pair[1] for pair in pairs if pair[1] is not None]
        table[objective] = {
            "clean_mean": statistics.fmean(clean),
            "clean_sd": statistics.stdev(clean) if len(clean) > 1 else 0.0,
            "robust_mean": statistics.fmean(robust) if robust else None,
            "robust_sd": statistics.stdev(robust) if len(robust) > 1 else 0.0,
            "seeds": seeds_of[objective],
            "clean_by_seed": clean,
            "robust_by_seed": robust,
        }
    result = {
        "seeds": args.seeds,
        "steps": args.steps,
        "tuning": {"grid": grid, "validation_accuracy": scores, "best": {"temperature": best[0], "alpha": best[1]}},
        "table": table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "kd_vs_sft.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (workdir / "kd_vs_sft.md").write_text(markdown)
    print(markdown)


def render(result: dict) -> str:
    lines = [
        f"KD vs SFT: {len(result['seeds'])} seeds, {result['steps']} steps each; "
        f"kd tuned on validation: T={result['tuning']['best']['temperature']:g}, "
        f"alpha={result['tuning']['best']['alpha']:g}",
        "",
        "| student | seeds | clean accuracy (mean ± sd) | robust accuracy (mean ± sd) | per seed (clean) |",
        "|---|---:|---:|---:|---|",
    ]
    for objective, row in result["table"].items():
        robust = f"{row['robust_mean']:.3f} ± {row['robust_sd']:.3f}" if row["robust_mean"] is not None else "—"
        seeds = ", ".join(f"{value:.3f}" for value in row["clean_by_seed"])
        lines.append(
            f"| {objective} | {len(row['seeds'])} | {row['clean_mean']:.3f} ± {row['clean_sd']:.3f} | {robust} | {seeds} |"
        )
    sft, kd = result["table"]["sft"]["clean_mean"], result["table"]["kd_topk"]["clean_mean"]
    lines += ["", f"kd_topk − sft (clean): {kd - sft:+.3f}; wall {result['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def _columns(dataset_dir: Path) -> set[str]:
    import pyarrow.parquet as pq

    shards = sorted((dataset_dir / "data").glob("*.parquet"))
    return set(pq.read_schema(shards[0]).names) if shards else set()


if __name__ == "__main__":
    main()

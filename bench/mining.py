"""Does hard-prompt mining help? Mined vs random extra prompts on the demo task, several seeds.

    python bench/mining.py                       # the demo's settings, 3 seeds
    python bench/mining.py --seeds 0 --steps 30 --candidates 200 --keep 40   # a smoke run

1. The demo dataset (`distill demo`'s build + capture-logits), built here if `--workdir`
   has none.
2. For each seed: the demo's KD student (configs/demo.yaml's `training:`) trained on it (the "base"), then `distill mine`
   twice from that student, with the same candidates (the same generators and seed, so
   the teacher answers them once, through the build's ledger) and the same count kept:
   `selection: hardest` (the highest KL(teacher || student) per token, at most half of one
   kind) and `selection: random`. Each new dataset trains a student from scratch with the
   same steps, learning rate and seed as the base, and `distill eval` scores it on the demo's
   held-out questions, clean and perturbed.
3. Per arm: mean ± sd over seeds of clean accuracy, robust accuracy and the robustness gap
   (clean − robust), and the share of the base's gap each arm closes.

Writes `mining.json` and `mining.md` in the work dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["OMP_NUM_THREADS"] = "1"  # tiny models: one thread per process (see flows/demo.py)

ARMS = ("hardest", "random")


def demo_dataset(workdir: Path, seed: int) -> dict:
    """The demo's config (its dataset built and captured in `workdir` when missing)."""
    from distillflow.tasks.train.demo_teacher import ensure_demo_teacher
    from distillflow.flows.build import build_command
    from distillflow.flows.capture_logits import capture_logits_command
    from distillflow.flows.demo import DemoBudget, demo_config

    teacher_dir = ensure_demo_teacher(ROOT / ".cache" / "demo")
    config = demo_config(workdir, teacher_dir, DemoBudget(seed=seed))
    path = workdir / "demo.yaml"
    if not (workdir / "dataset" / "manifest.json").is_file():
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        build_command(path)
    if not (workdir / "dataset" / "manifest.json").is_file() or "capture" not in json.loads(
        (workdir / "dataset" / "manifest.json").read_text()
    ):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        capture_logits_command(path)
    return config


def run_seed(config: dict, out: Path, seed: int, args: argparse.Namespace) -> dict:
    from distillflow.flows.mine import mine_command
    from distillflow.flows.train import train_command

    seed_dir = out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    base = json.loads(json.dumps(config))
    base["training"].update(seed=seed, max_steps=args.steps, output_dir=str(seed_dir / "base"))
    evaluation = base["evaluation"]
    evaluation["speed"] = None  # accuracy only; speed is the same model size for every arm
    evaluation["eval_sets"] = [{**item, "limit": args.eval_prompts} for item in evaluation["eval_sets"]]
    base_path = seed_dir / "base.yaml"
    base_path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "evaluation"}, sort_keys=False))
    if not (seed_dir / "base" / "final" / "config.json").is_file():
        train_command(base_path)
    result: dict = {"seed": seed}
    for arm in ARMS:
        arm_config = json.loads(json.dumps(base))
        arm_config["evaluation"]["output_dir"] = str(seed_dir / f"eval-{arm}")
        arm_config["mining"] = {
            "output_dir": str(seed_dir / f"data-{arm}"),
            "student": str(seed_dir / "base" / "final"),
            "candidates": args.candidates,
            "keep": args.keep,
            "selection": arm,
            "retrain": "from_scratch",
            "train_output_dir": str(seed_dir / arm),
            "eval_output_dir": str(seed_dir / f"eval-{arm}"),
            "random_seed": 0,  # the same candidates for every seed and arm (answered once)
        }
        path = seed_dir / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(arm_config, sort_keys=False))
        report_path = seed_dir / f"eval-{arm}" / "report.json"
        if not report_path.is_file():
            mine_command(path)
        rows = {row["model"]: row for row in json.loads(report_path.read_text())["table"]}
        result.setdefault("base", {"clean": rows["before"]["clean_acc"], "robust": rows["before"]["robust_acc"], "gap": rows["before"]["gap"]})
        result[arm] = {"clean": rows["after"]["clean_acc"], "robust": rows["after"]["robust_acc"], "gap": rows["after"]["gap"]}
        manifest = json.loads((seed_dir / f"data-{arm}" / "manifest.json").read_text())
        result[arm]["kept_per_kind"] = manifest["mining"]["kept_per_kind"]
        result[arm]["mean_score_kept"] = manifest["mining"]["mean_score_kept"]
    return result


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        f"Mining vs random extra prompts on the demo task: {len(seeds)} seed(s), {result['settings']['steps']} steps, "
        f"{result['settings']['keep']} of {result['settings']['candidates']} candidates added to "
        f"{result['settings']['dataset_rows']} rows",
        "",
        "| student | clean accuracy (mean ± sd) | robust accuracy | robustness gap | share of the base's gap closed | per seed (clean / gap) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for arm in ("base", *ARMS):
        clean = mean_sd([s[arm]["clean"] for s in seeds])
        robust = mean_sd([s[arm]["robust"] for s in seeds])
        gap = mean_sd([s[arm]["gap"] for s in seeds])
        closed = "–" if arm == "base" else f"{100 * result['summary'][arm]['gap_closed_share']:.0f}%"
        per_seed = ", ".join(f"{100 * s[arm]['clean']:.1f} / {100 * s[arm]['gap']:.1f}" for s in seeds)
        lines.append(
            f"| {arm} | {100 * clean[0]:.1f} ± {100 * clean[1]:.1f}% | {100 * robust[0]:.1f} ± {100 * robust[1]:.1f}% | "
            f"{100 * gap[0]:.1f} ± {100 * gap[1]:.1f} pt | {closed} | {per_seed} |"
        )
    summary = result["summary"]
    lines += [
        "",
        f"hardest − random: clean {100 * summary['clean_hardest_minus_random']:+.1f} pt, gap "
        f"{100 * summary['gap_hardest_minus_random']:+.1f} pt; targets (mining closes ≥ 1/3 of the gap and beats random): "
        f"{'met' if summary['target_met'] else 'missed'}; wall {result['seconds']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "mining-bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default: the demo's).")
    parser.add_argument("--candidates", type=int, default=3000)
    parser.add_argument("--keep", type=int, default=500)
    parser.add_argument("--eval-prompts", type=int, default=300)
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    started = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = demo_dataset(workdir, seed=0)
    args.steps = args.steps or config["training"]["max_steps"]
    seeds = []
    for seed in args.seeds:
        print(f"[mining-bench] seed {seed}", file=sys.stderr, flush=True)
        seeds.append(run_seed(config, workdir, seed, args))
    summary: dict = {}
    base_gap = statistics.fmean(s["base"]["gap"] for s in seeds)
    for arm in ARMS:
        gap = statistics.fmean(s[arm]["gap"] for s in seeds)
        summary[arm] = {
            "clean_change": statistics.fmean(s[arm]["clean"] - s["base"]["clean"] for s in seeds),
            "gap_change": gap - base_gap,
            "gap_closed_share": (base_gap - gap) / base_gap if base_gap else 0.0,
        }
    summary["clean_hardest_minus_random"] = statistics.fmean(s["hardest"]["clean"] - s["random"]["clean"] for s in seeds)
    summary["gap_hardest_minus_random"] = statistics.fmean(s["hardest"]["gap"] - s["random"]["gap"] for s in seeds)
    summary["target_met"] = summary["hardest"]["gap_closed_share"] >= 1 / 3 and summary["gap_hardest_minus_random"] < 0
    rows = json.loads((workdir / "dataset" / "manifest.json").read_text())["counts"]["accepted"]
    settings = {"steps": args.steps, "candidates": args.candidates, "keep": args.keep, "eval_prompts": args.eval_prompts, "dataset_rows": rows}
    result = {"settings": settings, "seeds": seeds, "summary": summary, "seconds": round(time.perf_counter() - started, 1)}
    (workdir / "mining.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (workdir / "mining.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

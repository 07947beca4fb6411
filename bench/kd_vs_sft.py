"""KD vs SFT on the demo task, at the demo's settings, over several seeds.

    python bench/kd_vs_sft.py                                  # 5 seeds, the default objectives
    python bench/kd_vs_sft.py --jobs 2                         # two trainings at a time (one per core)
    python bench/kd_vs_sft.py --learning-rate 3e-3             # the rate of the first tables
    python bench/kd_vs_sft.py --rows 500                       # the low-data regime: 500 training rows
    python bench/kd_vs_sft.py --objectives sft kd_topk --seeds 0 1 --steps 50 --quick   # a smoke run

1. The demo dataset (`distill demo`'s build + capture-logits: the demo teacher's answers and
   k tokens of its distribution per answer token): `--dataset DIR` of an earlier `distill
   demo` run (default runs/demo), built here when absent. Each capture method an objective
   needs (top-k, sampled) is captured into the work dir when the demo's is the other one.
   `--rows N` trains every student on the same first N rows of it.
2. For each seed and objective, the demo's student (same derived shape, steps, packing,
   batch and data order per seed; configs/demo.yaml's alpha; configs/demo.yaml's learning
   rate, 3.75e-4, where the objective sets none of its own, or --learning-rate):
     sft        the teacher's text (black box)
     kd_topk    the teacher's captured top-k logprobs (T = 2)
     kd_topk_T4_pure  the same at T = 4, alpha = 1 (pure KD: the case the tail rule decides);
                kd_topk_T4_pure_half_lr at 1.5e-3, paired with sft_half_lr
     kd_sampled the same bytes per token as k tokens DRAWN from the teacher (capture.method:
                sampled; T = 1, forward KL)
     kd_logits  the teacher's full logits, in process
     kd_hidden  the same (T = 2) plus the teacher's hidden states: the student's blocks matched
                to the teacher's blocks 4 and 8 (cosine, through a learned projection), at
                learning rate 1.5e-3
     kd_hidden_lr3e-3  the same at 3e-3
     sft_half_lr, sft_quarter_lr, sft_eighth_lr  sft at 1.5e-3, 7.5e-4 and 3.75e-4 (the
                demo's rate) whatever --learning-rate is; kd_sampled_half_lr, kd_sampled_quarter_lr, kd_sampled_eighth_lr
                and kd_logits_half_lr: those objectives at those rates, each paired with
                the sft student at its own rate
     on_policy  the student's own samples scored by the in-process teacher (lmbda 0.5, reverse KL)
     on_policy_after_kd_sampled  a second stage: the kd_sampled student of the same seed
                (list kd_sampled too), 300 steps on its own samples only (lmbda 1)
     reference  the true answers of the same prompts (not distillation: what the data could teach)
     untrained  the student's initialisation, not trained (the floor)
     sft_bpe    the same shape with a vocabulary of its own (the demo's 400-token BPE trained
                on the dataset's text; its own initialisation per seed), the teacher's text
     kd_greybox that student on the teacher's top-k (a top-k capture) aligned to its tokens;
                paired with sft_bpe, not sft
     sft_pruned, kd_hidden_pruned  a student copied from the teacher (2 of its blocks, MLPs
                pruned to 256 neurons: derive_student's Minitron-style pruning), sft and
                kd_hidden; kd_hidden_pruned is paired with sft_pruned
3. One `distill eval` of every student on the test set (prompts/seeds/skills_eval.jsonl),
   clean and under the robustness perturbations, with the spread of sampled answers on the
   families with several right answers.
4. Per objective: mean and 95 % confidence interval (Student's t over seeds) of clean and
   robust accuracy, per family; the paired difference to `sft` seed by seed, with its own
   95 % CI (the seeds share data order and initialisation, so pairing removes their noise).

Writes kd_vs_sft.json and kd_vs_sft.md in the work dir and prints the table. Trained students
are reused by a rerun with the same work dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As `distill` does: the flows' temporary Prefect server may take minutes to start on 2 busy
# cores (two trainings beside it), where Prefect's default is 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

PRUNED = {"num_layers": 2, "intermediate_size": 256}
# A student a third the demo's size (0.08 M parameters, 1/22 of the teacher's): less room to
# imitate the teacher's answers, so more for its distribution to teach?
SMALL = {"num_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "intermediate_size": 128}
# The rate the first tables of docs/kd_vs_sft.md were measured at (`--learning-rate 3e-3`; the
# default is the demo's, configs/demo.yaml). The demo trains at an eighth of it (3.75e-4),
# where sft learns the teacher's answers best; the *_lr objectives carry the rates between.
FIRST_TABLES_LEARNING_RATE = 3.0e-3
# The KD recipes that appear at several learning rates or student shapes:
# kd_topk on a sampled capture (an estimate of p itself, so T = 1, forward KL), and the
# teacher's full logits (T = 2) plus its hidden states: the student's two blocks' outputs
# matched (cosine, through a learned projection) to the teacher's blocks 4 and 8.
SAMPLED = {"objective": "kd_topk", "temperature": 1.0, "divergence": "forward_kl"}
HIDDEN = {"objective": "hidden", "temperature": 2.0, "hidden_layer_pairs": [[4, 1], [8, 2]], "hidden_loss": "cosine"}
ON_POLICY = {
    "objective": "on_policy", "divergence": "reverse_kl", "temperature": 1.0,
    "sampling_temperature": 1.0, "max_new_tokens": 16, "packing": False, "micro_batch_size": 32,
}  # fmt: skip
OBJECTIVES: dict[str, dict[str, Any]] = {
    "sft": {"objective": "sft"},
    "kd_topk": {"objective": "kd_topk", "temperature": 2.0},
    "kd_topk_T4_pure": {"objective": "kd_topk", "temperature": 4.0, "alpha": 1.0},
    # Pure KD at T = 4 at four times the demo's rate: a student fitted to logits tempered by 4
    # must grow them about 4-fold to answer as sharply at T = 1.
    "kd_topk_T4_pure_half_lr": {"objective": "kd_topk", "temperature": 4.0, "alpha": 1.0, "learning_rate": 1.5e-3},
    "kd_sampled": SAMPLED,
    "kd_logits": {"objective": "kd_logits", "temperature": 2.0},
    "kd_hidden": {**HIDDEN, "learning_rate": 1.5e-3},
    # kd_hidden at the other students' rate (3e-3): one seed in five fails to train.
    "kd_hidden_lr3e-3": {**HIDDEN, "learning_rate": 3.0e-3},
    # Lower rates: half, a quarter and an eighth of FIRST_TABLES_LEARNING_RATE (the demo's 3.75e-4).
    "sft_half_lr": {"objective": "sft", "learning_rate": 1.5e-3},
    "kd_sampled_half_lr": {**SAMPLED, "learning_rate": 1.5e-3},
    "kd_logits_half_lr": {"objective": "kd_logits", "temperature": 2.0, "learning_rate": 1.5e-3},
    "sft_quarter_lr": {"objective": "sft", "learning_rate": 7.5e-4},
    "sft_eighth_lr": {"objective": "sft", "learning_rate": 3.75e-4},
    "kd_sampled_quarter_lr": {**SAMPLED, "learning_rate": 7.5e-4},
    "kd_sampled_eighth_lr": {**SAMPLED, "learning_rate": 3.75e-4},
    "on_policy": {**ON_POLICY, "lmbda": 0.5},
    # On-policy distillation as a second stage (GKD, MiniLLM, Qwen3's on-policy stage): the
    # trained kd_sampled student of the same seed, 300 more steps on its own answers only
    # (lmbda 1), each token scored by the in-process teacher (reverse KL), at the base rate.
    "on_policy_after_kd_sampled": {**ON_POLICY, "lmbda": 1.0, "from": "kd_sampled", "max_steps": 300},
    "reference": {"objective": "sft"},
    "untrained": {},
    # A student copied from the teacher instead (derive_student: 2 of its 8 blocks, each MLP
    # pruned to its 256 most important neurons; 0.22 of its parameters), same steps:
    "sft_pruned": {"objective": "sft", "derive_student": PRUNED},
    "kd_hidden_pruned": {**HIDDEN, "derive_student": PRUNED},
    # The SMALL student, at the base rate and at twice the demo's (7.5e-4); paired by rate:
    "sft_small": {"objective": "sft", "derive_student": SMALL},
    "kd_sampled_small": {**SAMPLED, "derive_student": SMALL},
    "sft_small_quarter_lr": {"objective": "sft", "derive_student": SMALL, "learning_rate": 7.5e-4},
    "kd_sampled_small_quarter_lr": {**SAMPLED, "derive_student": SMALL, "learning_rate": 7.5e-4},
    # A student of the same shape with a vocabulary of its own (the demo's 400-token BPE):
    "sft_bpe": {"objective": "sft"},
    "kd_greybox": {"objective": "kd_greybox", "temperature": 1.0, "divergence": "forward_kl"},  # top-k aligned to its tokens
}
OWN_VOCABULARY = ("sft_bpe", "kd_greybox")
DEFAULT_OBJECTIVES = ("sft", "kd_topk", "reference", "untrained")
# Two-sided 95 % quantiles of Student's t by degrees of freedom (1.96 beyond the table).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95 % confidence interval (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values), "values": values}
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "n": len(values), "values": values}


def subset_dataset(dataset_dir: Path, rows: int, out_dir: Path) -> Path:
    """The first `rows` accepted rows of a dataset (every column), as a dataset of its own."""
    import pyarrow.parquet as pq

    from distillflow.storage.parquet import read_table, write_table_atomic

    if (out_dir / "data" / "part-00000.parquet").is_file():
        return out_dir
    table = read_table(dataset_dir / "data")
    if rows > table.num_rows:
        raise SystemExit(f"--rows {rows}: {dataset_dir} holds only {table.num_rows} rows")
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    write_table_atomic(table.slice(0, rows), out_dir / "data" / "part-00000.parquet")
    for name in ("manifest.json",):
        if (dataset_dir / name).is_file():
            (out_dir / name).write_text((dataset_dir / name).read_text())
    assert pq.read_metadata(out_dir / "data" / "part-00000.parquet").num_rows == rows
    return out_dir


def captured_with(config: dict, workdir: Path, dataset_dir: Path, method: str) -> Path:
    """`dataset_dir` as captured with capture.method `method` (same k): itself when its own
    capture is that one, else captured again into the work dir."""
    from distillflow.flows.demo import capture_into

    manifest = json.loads((dataset_dir / "manifest.json").read_text()) if (dataset_dir / "manifest.json").is_file() else {}
    if (manifest.get("capture") or {}).get("method", "topk") == method:
        return dataset_dir
    out_dir = workdir / f"dataset-{method}"
    if (out_dir / "manifest.json").is_file():
        return out_dir
    return capture_into(config, dataset_dir, out_dir, method, workdir / "configs" / f"capture-{method}.yaml")


def untrained_student(config: dict, workdir: Path, name: str, seed: int) -> Path:
    """The demo student's initialisation for `seed`, saved as a model directory."""
    from distillflow.training.config import DeriveStudentConfig
    from distillflow.training.model import derive_student
    from distillflow.training.vocabulary import load_tokenizer

    final = workdir / "students" / name / "final"
    if (final / "config.json").is_file():
        return final
    training = config["training"]
    model = derive_student(training["teacher"], DeriveStudentConfig(**training["derive_student"]), seed=seed)
    model.save_pretrained(str(final))
    load_tokenizer(training["teacher"]).save_pretrained(str(final))
    return final


def train_student(
    config: dict, workdir: Path, name: str, dataset_dir: Path, init: Path | None = None, **training
) -> Path:
    """One student trained by `python -m distillflow.training.train` (the process `distill train` runs)."""
    from distillflow.flows.demo import student_config

    variant = student_config(config, workdir / "students", name, dataset_dir, init)
    variant["training"].update(training)
    variant["training"]["output_dir"] = str(workdir / "students" / name)
    path = workdir / "configs" / f"{name}.yaml"
    final = workdir / "students" / name / "final"
    if (final / "config.json").is_file():  # finished in an earlier run of the bench: reused if alike
        earlier = yaml.safe_load(path.read_text()) if path.is_file() else None
        if earlier is None or _settings(earlier) != _settings(variant):
            raise SystemExit(
                f"{final} was trained with other settings than this run's {name} (or none are recorded "
                f"in {path}): pass another --workdir, or delete {final.parent}"
            )
        return final
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(variant, sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.training.train", "--config", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return final


def _settings(variant: dict) -> dict:
    """What a student's training depends on: its config's training section, output dir aside."""
    return {key: value for key, value in variant["training"].items() if key != "output_dir"}


# Rough training cost of each objective (sft = 1): the longest start first, so that --jobs
# processes finish together.
COST = {"on_policy": 10.0, "kd_logits": 3.0, "hidden": 3.0}


def train_all(config: dict, workdir: Path, trainings: list[tuple[str, Path, dict]], jobs: int) -> dict[str, Path]:
    """Each (name, dataset, settings) student trained, `jobs` processes at a time (one thread
    each); the first failure stops the bench (the others finish their training first)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[str, Path, dict]) -> Path:
        name, data, settings = job
        settings = dict(settings)
        init = settings.pop("init")
        return train_student(config, workdir, name, data, init, **settings)

    ordered = sorted(trainings, key=lambda job: -COST.get(job[2].get("objective", ""), 1.0))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip([name for name, _, _ in ordered], pool.map(one, ordered)))


def train_in_stages(config: dict, workdir: Path, trainings: list[tuple[str, Path, dict]], jobs: int) -> dict[str, Path]:
    """`train_all`, first the students trained from their initialisation, then the second
    stages (settings with `from`: an objective), each from that objective's student of its seed."""
    students = train_all(config, workdir, [job for job in trainings if "from" not in job[2]], jobs)
    second = []
    for name, data, settings in trainings:
        if "from" in settings:
            settings = dict(settings)
            first = students[f"{settings.pop('from')}-seed{settings['seed']}"]
            second.append((name, data, {**settings, "student": str(first), "derive_student": None}))
    students.update(train_all(config, workdir, second, jobs))
    return students


def evaluate(config: dict, workdir: Path, models: dict[str, Path], eval_set: Path) -> dict:
    """One `distill eval` of `models` on the test set (clean, perturbed, spread); report.json."""
    from distillflow.flows.evaluate import eval_command

    evaluation = json.loads(json.dumps(config["evaluation"]))
    evaluation["output_dir"] = str(workdir / "eval")
    evaluation["models"] = [{"name": name, "path": str(path)} for name, path in models.items()]
    evaluation["eval_sets"] = [{"name": "test", "path": str(eval_set)}]
    evaluation["speed"] = None  # accuracy only: the demo reports speed
    evaluation.pop("reference_model", None)  # the teacher is not among these models
    evaluation.pop("heldout", None)
    run_config = {**config, "evaluation": evaluation}
    for section in ("training", "sweep", "mining"):
        run_config.pop(section, None)
    path = workdir / "configs" / "eval.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(run_config, sort_keys=False))
    return eval_command(path)


def scores(entry: dict) -> dict[str, Any]:
    """The figures the bench compares, from one model's report.json entry."""
    out = {
        "clean": entry["accuracy"]["accuracy"],
        "robust": (entry.get("robustness") or {}).get("robust_accuracy"),
        "family": {name: value["accuracy"] for name, value in entry["accuracy"].get("per_family", {}).items()},
    }
    for family, spread in (entry.get("spread") or {}).items():
        out["family"][f"{family} spread"] = spread["spread"]
        out["family"][f"{family} validity"] = spread["validity"]
    return out


SFT_AT_OTHER_RATES = ("sft_half_lr", "sft_quarter_lr", "sft_eighth_lr")
# The sft students a KD student may be paired with, by shape: the first is at the base rate.
SFT_BASELINES = ("sft", *SFT_AT_OTHER_RATES)
SMALL_SFT_BASELINES = ("sft_small", "sft_small_quarter_lr")


def learning_rate(objective: str, base: float) -> float:
    """The rate `objective` trains at: its own, else the run's base rate (--learning-rate)."""
    return OBJECTIVES[objective].get("learning_rate", base)


def uses_sampled_capture(objective: str) -> bool:
    """Whether `objective` learns from a sampled capture (the SAMPLED recipe at any rate)."""
    recipe = OBJECTIVES[objective]
    return all(recipe.get(key) == value for key, value in SAMPLED.items())


def sft_of(objective: str, base: float, present: Any = OBJECTIVES) -> str:
    """The sft student an objective is paired with: the one with the same vocabulary, shape and
    learning rate among `present` (`sft` itself where several train at that rate)."""
    if objective in OWN_VOCABULARY:
        return "sft_bpe"
    if objective.endswith("_pruned"):
        return "sft_pruned"
    baselines = SMALL_SFT_BASELINES if "_small" in objective else SFT_BASELINES
    if objective in baselines[1:]:  # sft at another rate: against sft at the base rate
        return baselines[0]
    rate = learning_rate(objective, base)
    same_rate = [name for name in baselines if name in present and learning_rate(name, base) == rate]
    return same_rate[0] if same_rate else baselines[0]


def summarise(per_seed: dict[str, dict[int, dict]], seeds: list[int], base: float) -> dict[str, Any]:
    """Mean ± CI per objective and metric; paired differences to its sft (`sft_of`)."""
    table: dict[str, Any] = {}
    for objective, by_seed in per_seed.items():
        runs = [by_seed[seed] for seed in seeds if seed in by_seed]
        metrics = {"clean": [r["clean"] for r in runs], "robust": [r["robust"] for r in runs if r["robust"] is not None]}
        for name in sorted({name for r in runs for name in r["family"]}):
            metrics[name] = [r["family"][name] for r in runs if r["family"].get(name) is not None]
        row = {metric: mean_ci(values) for metric, values in metrics.items() if values}
        baseline = sft_of(objective, base, per_seed)
        if objective != baseline and baseline in per_seed:
            shared = [seed for seed in seeds if seed in by_seed and seed in per_seed[baseline]]
            for metric in ("clean", "robust"):
                diffs = [
                    by_seed[s][metric] - per_seed[baseline][s][metric]
                    for s in shared
                    if by_seed[s][metric] is not None and per_seed[baseline][s][metric] is not None
                ]
                if diffs:
                    row[f"{metric}_minus_sft"] = mean_ci(diffs)
        table[objective] = row
    return table


def _rate(value: float) -> str:
    """3e-3, 3.75e-4: a learning rate as the docs write it."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _pct(stat: dict | None) -> str:
    if not stat:
        return "–"
    if stat["ci95"] is None:
        return f"{100 * stat['mean']:.1f} %"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['ci95']:.1f}"


def _pt(stat: dict | None) -> str:
    if not stat:
        return "–"
    mean = 100 * stat["mean"]
    if stat["ci95"] is None:
        return f"{mean:+.1f}"
    half = 100 * stat["ci95"]
    verdict = "excludes 0" if abs(mean) > half else "includes 0"
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] ({verdict})"


def render(result: dict) -> str:
    """The bench's tables (markdown): overall, then per family."""
    table = result["table"]
    base = result.get("learning_rate", FIRST_TABLES_LEARNING_RATE)  # reports before the flag: 3e-3
    other_rates = {learning_rate(name, base) for name in table if name in SFT_BASELINES + SMALL_SFT_BASELINES}
    lines = [
        f"KD vs SFT on the demo task: seeds {result['seeds']}, {result['steps']} steps, "
        f"{result['rows'] if result['rows'] else 'all'} training rows; "
        f"`python bench/kd_vs_sft.py {result['argv']}`"
        + (f"; {result['versions']}." if result.get("versions") else "."),
        "Mean ± half-width of the 95 % CI over seeds; differences are paired by seed"
        + (", with `sft`, or with `sft_bpe` for a student with its own vocabulary."
           if any(objective in OWN_VOCABULARY for objective in table)
           else ", each KD student with the sft student at its own learning rate, and each sft student"
                f" with sft of its shape at {_rate(base)}." if len(other_rates) > 1 else "."),
        "",
        "| student | clean acc | robust acc | clean − sft (95 % CI) | robust − sft (95 % CI) |",
        "|---|---:|---:|---:|---:|",
    ]
    for objective, row in table.items():
        lines.append(
            f"| {objective} | {_pct(row.get('clean'))} | {_pct(row.get('robust'))} | "
            f"{_pt(row.get('clean_minus_sft'))} | {_pt(row.get('robust_minus_sft'))} |"
        )
    families = sorted({m for row in table.values() for m in row if m not in ("clean", "robust") and "minus" not in m})
    if families:
        lines += ["", "| student | " + " | ".join(families) + " |", "|---|" + "---:|" * len(families)]
        for objective, row in table.items():
            lines.append(f"| {objective} | " + " | ".join(_pct(row.get(f)) for f in families) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from distillflow.flows.capture_logits import capture_logits_command
    from distillflow.flows.demo import DemoBudget, demo_command, own_vocabulary_init, write_reference_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="default: runs/kd-vs-sft (-rowsN with --rows)")
    parser.add_argument("--dataset", type=Path, default=ROOT / "runs" / "demo", help="A `distill demo` run dir.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--rows", type=int, default=None, help="Train on the first N rows only (low-data regime).")
    parser.add_argument("--steps", type=int, default=DemoBudget().student_steps)
    parser.add_argument(
        "--learning-rate", type=float, default=None,
        help="The rate of every objective that sets none of its own (default: configs/demo.yaml's).",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="Trainings at a time (each on one thread).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: a smoke run of the bench itself.")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs: at least 1")
    for objective in args.objectives:
        first = OBJECTIVES[objective].get("from")
        if first is not None and first not in args.objectives:
            parser.error(f"--objectives: {objective} continues from {first}'s students; list {first} too")
    from provenance import provenance, versions  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"  # tiny models: one thread per process (see flows/demo.py)
    default_workdir = ROOT / "runs" / ("kd-vs-sft" if args.rows is None else f"kd-vs-sft-rows{args.rows}")
    workdir = (args.workdir or default_workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    budget = DemoBudget(num_prompts=200, eval_prompts=20) if args.quick else DemoBudget()
    source = args.dataset.resolve()
    if not (source / "dataset" / "manifest.json").is_file():
        print(f"building the demo dataset in {source}…", flush=True)
        demo_command(source, train_student=False, budget=budget)
    config = yaml.safe_load((source / "demo.yaml").read_text())
    base_rate = args.learning_rate
    if base_rate is None:
        base_rate = float(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["training"]["learning_rate"])
    if "teacher_topk" not in _columns(source / "dataset"):
        capture_logits_command(source / "demo.yaml")
    dataset_dir = source / "dataset"
    reference_dir = workdir / "reference-data"
    write_reference_dataset(dataset_dir, Path(config["seeds"][0]["path"]), reference_dir)
    if args.rows is not None:
        dataset_dir = subset_dataset(dataset_dir, args.rows, workdir / "dataset")
        reference_dir = subset_dataset(reference_dir, min(args.rows, _rows(reference_dir)), workdir / "reference-subset")
    test_set = Path(config["evaluation"]["eval_sets"][0]["path"])
    captured = {
        objective: captured_with(config, workdir, dataset_dir, "sampled" if uses_sampled_capture(objective) else "topk")
        for objective in args.objectives
        if OBJECTIVES[objective].get("objective") in ("kd_topk", "kd_greybox") or objective in OWN_VOCABULARY
    }

    students: dict[str, Path] = {}
    trainings: list[tuple[str, Path, dict[str, Any]]] = []
    for seed in args.seeds:
        for objective in args.objectives:
            name = f"{objective}-seed{seed}"
            if objective == "untrained":
                students[name] = untrained_student(config, workdir, name, seed)
                continue
            data = {"reference": reference_dir, **captured}.get(objective) or dataset_dir
            init = (
                own_vocabulary_init(
                    config["training"]["derive_student"], dataset_dir, workdir / "students" / f"bpe-init-seed{seed}", seed
                )
                if objective in OWN_VOCABULARY else None
            )
            settings = {"learning_rate": base_rate, **OBJECTIVES[objective]}
            trainings.append((name, data, {"init": init, "max_steps": args.steps, "seed": seed, **settings}))
    students.update(train_in_stages(config, workdir, trainings, args.jobs))
    students = {f"{o}-seed{s}": students[f"{o}-seed{s}"] for s in args.seeds for o in args.objectives}
    report = evaluate(config, workdir, students, test_set)
    per_seed: dict[str, dict[int, dict]] = {objective: {} for objective in args.objectives}
    for objective in args.objectives:
        for seed in args.seeds:
            per_seed[objective][seed] = scores(report["models"][f"{objective}-seed{seed}"])
    result = {
        "argv": " ".join(sys.argv[1:]),
        "versions": versions(),
        "seeds": args.seeds,
        "steps": args.steps,
        "rows": args.rows,
        "learning_rate": base_rate,
        "training": {"temperature": config["training"]["temperature"], "alpha": config["training"]["alpha"]},
        "per_seed": per_seed,
        "table": summarise(per_seed, args.seeds, base_rate),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "kd_vs_sft.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (workdir / "kd_vs_sft.md").write_text(markdown)
    print(markdown)


def _rows(dataset_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(path).num_rows for path in (dataset_dir / "data").glob("*.parquet"))


def _columns(dataset_dir: Path) -> set[str]:
    import pyarrow.parquet as pq

    shards = sorted((dataset_dir / "data").glob("*.parquet"))
    return set(pq.read_schema(shards[0]).names) if shards else set()


if __name__ == "__main__":
    main()

"""`distill demo`: the whole pipeline on the embedded default, on CPU, offline, measured.

1. the demo teacher (shipped weights; `prompts/skills.py` is its task family),
2. `build_dataset` with the in-process teacher: seed questions and adversarial variants,
3. `capture-logits`: k tokens drawn from the teacher's distribution at every answer token
   (`capture.method: sampled`),
4. three students of the same size (≤ 1/4 of the teacher's parameters, same initialisation)
   in the teacher's vocabulary, trained with DeepSpeed: `sft` on the teacher's text (black
   box), `kd_sampled` on the captured tokens (white box, T = 1: configs/demo.yaml's
   `training:` settings) and `reference` on the true answers of the same prompts,
5. two students of that size with a vocabulary of their own (a byte-level BPE trained on the
   dataset's text, as a student picked off the shelf has its own tokenizer): `sft_bpe` on
   the teacher's text and `kd_greybox` on the teacher's top-k (a second capture,
   `capture.method: topk`), aligned to the student's tokens on the answer's bytes,
6. `distill eval`: the teacher and the five students on held-out questions (words and
   numbers none of them saw), clean and perturbed, plus speed and size; the comparison
   table and the report's path at the end.

The students train `PARALLEL_TRAININGS` at a time, each a `distill train` process of its own
(one thread each: a 2-core machine trains two), its output in students/NAME/train.log.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from distillflow.resources import packaged
from distillflow.storage.manifest import Manifest

DEMO_CONFIG = packaged("configs/demo.yaml")
OWN_VOCABULARY_STUDENTS = ("sft_bpe", "kd_greybox")  # a BPE of their own, not the teacher's
KD_STUDENT = "kd_sampled"  # trained with configs/demo.yaml's `training:` settings
STUDENTS = ("sft", KD_STUDENT, "reference", *OWN_VOCABULARY_STUDENTS)
# The other students: their objective over configs/demo.yaml's training settings.
STUDENT_OBJECTIVES: dict[str, dict[str, Any]] = {
    "sft": {"objective": "sft"},
    "reference": {"objective": "sft"},
    "sft_bpe": {"objective": "sft"},
    "kd_greybox": {"objective": "kd_greybox", "temperature": 1.0, "divergence": "forward_kl"},
}
STUDENT_VOCABULARY = 400  # tokens of the own-vocabulary students' BPE
PARALLEL_TRAININGS = 2  # students trained at once (one thread each)
TRAINING_TIMEOUT_S = 3600.0  # one student's `distill train`, start to finish
STOP_GRACE_S = 4.0  # Ctrl-C: how long a `distill train` has to stop its trainer before it is killed


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo does; the defaults are what `distill demo` runs."""

    num_prompts: int = 4000
    student_steps: int = 1200
    eval_prompts: int = 300
    speed_prompts: int = 32  # prompts timed at batch 1 and in one batch of 32
    seed: int = 0


def _resolve(path: str) -> str:
    """A path of configs/demo.yaml: absolute, or a file shipped with distillflow."""
    return str(path if Path(path).is_absolute() else packaged(path))


def demo_config(workdir: Path, teacher_dir: Path, budget: DemoBudget) -> dict[str, Any]:
    """configs/demo.yaml with the teacher, the budget and the output dirs filled in."""
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    config["output_dir"] = str(workdir / "dataset")
    config["seeds"] = [{**seed, "path": _resolve(seed["path"])} for seed in config["seeds"]]
    config["prompts"]["num_prompts"] = budget.num_prompts
    config["prompts"]["random_seed"] = budget.seed
    config["teacher"]["model"] = str(teacher_dir)
    config["capture"]["model"] = str(teacher_dir)
    training = config["training"]
    training.update(
        dataset_dir=str(workdir / "dataset"),
        output_dir=str(workdir / "students" / KD_STUDENT),
        teacher=str(teacher_dir),
        max_steps=budget.student_steps,
        seed=budget.seed,
        deepspeed_config=_resolve(training["deepspeed_config"]),
    )
    evaluation = config["evaluation"]
    evaluation["output_dir"] = str(workdir / "eval")
    evaluation["models"] = [{"name": "teacher", "path": str(teacher_dir)}] + [
        {"name": name, "path": str(workdir / "students" / name / "final")} for name in STUDENTS
    ]
    evaluation["eval_sets"] = [
        {**item, "path": _resolve(item["path"]), "limit": budget.eval_prompts} for item in evaluation["eval_sets"]
    ]
    evaluation["speed"]["prompts"] = budget.speed_prompts
    config["sweep"]["output_dir"] = str(workdir / "sweep")
    mining = config["mining"]
    mining.update(
        student=str(workdir / "students" / KD_STUDENT / "final"),
        output_dir=str(workdir / "dataset-mined"),
        train_output_dir=str(workdir / "students" / f"{KD_STUDENT}-mined"),
        eval_output_dir=str(workdir / "eval-mined"),
    )
    return config


def student_config(
    config: dict[str, Any], workdir: Path, name: str, dataset_dir: Path, init: Path | None = None
) -> dict[str, Any]:
    """The run config of one student: same shape, data order, steps and settings; other
    objective. `init`: an own-vocabulary student's initial model directory (instead of a
    student derived from the teacher)."""
    variant = json.loads(json.dumps(config))
    training = variant["training"]
    training["output_dir"] = str(workdir / "students" / name)
    training["dataset_dir"] = str(dataset_dir)
    if name != KD_STUDENT:
        training.update(STUDENT_OBJECTIVES.get(name, {"objective": "sft"}))
    if init is not None:
        training["student"] = str(init)
        training.pop("derive_student", None)
        training.pop("teacher", None)  # grey-box: the teacher's tokens are in the data
    for section in ("evaluation", "sweep", "mining"):
        variant.pop(section, None)
    return variant


def capture_into(config: dict[str, Any], input_dir: Path, out_dir: Path, method: str, config_path: Path) -> Path:
    """`input_dir` captured again into `out_dir` with capture.method `method` (same teacher and
    k); the run config goes to `config_path`. The demo's grey-box students need the teacher's k
    most likely tokens (`topk`) where its own capture draws them."""
    from distillflow.flows.capture_logits import capture_logits_command

    variant = json.loads(json.dumps(config))
    variant["capture"].update(method=method, input_dir=str(input_dir), output_dir=str(out_dir))
    variant["training"]["dataset_dir"] = str(input_dir)
    for section in ("evaluation", "sweep", "mining"):
        variant.pop(section, None)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(variant, sort_keys=False), encoding="utf-8")
    capture_logits_command(config_path)
    return out_dir


def own_vocabulary_init(
    shape: dict[str, int], dataset_dir: Path, out_dir: Path, seed: int, vocab_size: int = STUDENT_VOCABULARY
) -> Path:
    """The own-vocabulary students' initial model: `shape` (derive_student's keys) over a BPE
    of `vocab_size` tokens trained on the dataset's questions and answers."""
    from distillflow.storage.parquet import read_table
    from distillflow.training.scratch import own_vocabulary_student

    rows = read_table(dataset_dir / "data", columns=["prompt", "response"]).to_pylist()
    texts = [f"{row['prompt']} {row['response']}" for row in rows]
    return own_vocabulary_student(out_dir, texts, vocab_size, shape, seed)


def write_reference_dataset(dataset_dir: Path, seeds_path: Path, out_dir: Path) -> int:
    """The built dataset's prompts with their TRUE answers instead of the teacher's.

    A variant keeps its seed's answer when the seed's argument is still in it verbatim
    (a typo inside the word would change the answer; such rows are left out). Returns
    the number of rows written.
    """
    import pyarrow as pa

    from distillflow.records import content_id
    from distillflow.storage.parquet import read_table, write_table_atomic

    truth: dict[str, tuple[str, str, str]] = {}
    for line in seeds_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        truth[content_id(row["prompt"])] = (row["reference"], row["protect"][0], row.get("check") or "exact")
    table = read_table(dataset_dir / "data", columns=["id", "prompt", "strategy", "parent_id"])
    rows = {"id": [], "prompt": [], "response": [], "strategy": []}
    for row in table.to_pylist():
        seed_id = row["id"] if row["strategy"] == "seed" else row["parent_id"]
        if seed_id not in truth:
            continue
        reference, argument, check = truth[seed_id]
        if argument not in row["prompt"]:
            continue
        if check == "one_of":  # several right answers: one of them, drawn per row (as the teacher was taught)
            reference = random.Random(row["id"]).choice(reference.split("|"))
        rows["id"].append(row["id"])
        rows["prompt"].append(row["prompt"])
        rows["response"].append(reference)
        rows["strategy"].append(row["strategy"])
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    write_table_atomic(pa.table(rows), out_dir / "data" / "part-00000.parquet")
    return len(rows["id"])


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def train_in_parallel(
    jobs: list[tuple[str, Path]], students_dir: Path, parallel: int, timeout_s: float = TRAINING_TIMEOUT_S
) -> dict[str, dict[str, Any]]:
    """`distill train CONFIG` for each (name, config) job, `parallel` processes at a time, in
    the order given; each one's output goes to students_dir/NAME/train.log. Returns each
    student's final metrics (the metrics.json of its training.output_dir), by name.

    A training that fails or runs past `timeout_s` stops the others and raises DemoFailed with
    the end of its log. On Ctrl-C (or any error) every running `distill train` gets SIGINT,
    stops its trainer and exits; one still running STOP_GRACE_S later is killed."""
    from distillflow.tasks.train.student import read_metrics

    pending, running, metrics = list(jobs), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, path = pending.pop(0)
                log_path = students_dir / name / "train.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("w", encoding="utf-8") as log:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "distillflow.cli", "train", str(path)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                running[name] = (process, time.perf_counter(), log_path)
            time.sleep(0.2)
            for name, (process, started, log_path) in list(running.items()):
                seconds = time.perf_counter() - started
                if process.poll() is None and seconds <= timeout_s:
                    continue
                if process.returncode != 0:
                    what = f"exited with code {process.returncode}" if process.returncode is not None else (
                        f"did not finish in {timeout_s:.0f} s")
                    tail = "\n".join(f"  | {line}" for line in log_path.read_text(errors="replace").splitlines()[-25:])
                    raise DemoFailed(f"training the {name} student {what}; the end of {log_path}:\n{tail}")
                del running[name]
                output_dir = yaml.safe_load(dict(jobs)[name].read_text(encoding="utf-8"))["training"]["output_dir"]
                metrics[name] = read_metrics(output_dir)[1]
                _say(f"trained {name} in {seconds:.0f} s")
    finally:
        _stop(process for process, _, _ in running.values())
    return metrics


def _stop(processes: Any) -> None:
    """Stop each running `distill train` as Ctrl-C does (it stops its trainer first): a
    terminal's Ctrl-C has reached them already, so they get a moment to exit on their own,
    then SIGINT; what still runs STOP_GRACE_S after is killed (inside the demo's own grace
    period, distillflow/interrupt.py)."""
    processes = [process for process in processes if process.poll() is None]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(process.poll() is None for process in processes):
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class DemoFailed(RuntimeError):
    """A step of the demo failed; the message says which and quotes its log."""


def demo_command(
    workdir: str | Path = "runs/demo", train_student: bool = True, budget: DemoBudget | None = None
) -> dict[str, Any]:
    from distillflow.flows.build import build_command
    from distillflow.flows.capture_logits import capture_logits_command
    from distillflow.flows.evaluate import eval_command
    from distillflow.storage.inspect import inspect_dataset
    from distillflow.tasks.train.demo_teacher import ensure_demo_teacher

    budget = budget or DemoBudget()
    started = time.perf_counter()
    # Tiny models: one thread per process is as fast as two, and steady when other work
    # shares the cores (two threads that wait on each other slow every step down). The
    # training subprocesses inherit it; eval's timings are single-thread for every model.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    teacher_dir = ensure_demo_teacher(workdir / "teacher-cache")  # used only when the shipped one is stale
    _say(f"teacher: {teacher_dir}")
    config = demo_config(workdir, teacher_dir, budget)
    config_path = workdir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    _say(f"building the dataset ({config_path})…")
    manifest = build_command(config_path)
    print(inspect_dataset(workdir / "dataset", samples=3))
    result: dict[str, Any] = {"dataset": str(workdir / "dataset"), "counts": Manifest.of(manifest).counts, "budget": asdict(budget)}
    if not train_student:
        return result

    _say(f"capturing {config['capture']['k']} tokens of the teacher's distribution per answer token…")
    capture_logits_command(config_path)
    seeds_path = Path(config["seeds"][0]["path"])
    reference_dir = workdir / "reference-data"
    rows = write_reference_dataset(workdir / "dataset", seeds_path, reference_dir)
    _say(f"reference dataset: {rows} rows with true answers ({reference_dir})")

    _say("capturing the teacher's top-k for the students with a vocabulary of their own…")
    topk_dir = capture_into(
        config, workdir / "dataset", workdir / "dataset-topk", "topk", workdir / "capture-topk.yaml"
    )
    shape = config["training"]["derive_student"]
    init = own_vocabulary_init(shape, workdir / "dataset", workdir / "student-bpe-init", budget.seed)
    _say(f"own-vocabulary student: {STUDENT_VOCABULARY}-token BPE trained on the dataset's text ({init})")

    jobs = []
    for name in STUDENTS:
        own = name in OWN_VOCABULARY_STUDENTS
        dataset_dir = reference_dir if name == "reference" else topk_dir if own else workdir / "dataset"
        path = workdir / f"student-{name}.yaml"
        variant = student_config(config, workdir, name, dataset_dir, init if own else None)
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        jobs.append((name, path))
    _say(
        f"training {len(jobs)} students with DeepSpeed ({budget.student_steps} steps each, "
        f"{PARALLEL_TRAININGS} at a time; logs in {workdir / 'students'}/NAME/train.log)…"
    )
    result["training"] = train_in_parallel(jobs, workdir / "students", PARALLEL_TRAININGS)

    _say("evaluating the teacher and the students…")
    result["report"] = eval_command(config_path)
    result["report_path"] = str(workdir / "eval" / "report.md")
    result["seconds"] = round(time.perf_counter() - started, 1)
    _say(f"done in {result['seconds']:.0f} s: report in {workdir / 'eval'}")
    return result

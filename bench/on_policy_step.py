"""Cost of an on_policy micro-batch vs a kd_logits one, at the demo's models.

Teacher: the demo teacher (distillflow/assets/demo-teacher); student: derived from it as in
configs/demo.yaml (2 layers, hidden 96). Rows: prompts of prompts/seeds/skills.jsonl with
their reference answers, tokenised with the teacher's chat template. One micro-batch of
--rows rows, three ways, each forward + backward + AdamW step on the same student:

  kd_logits   the dataset's answers, in-process teacher (the baseline)
  sft         the dataset's answers, cross-entropy only
  on_policy   the student samples the answers (at most --max-new-tokens, stop at eos), then
              the in-process teacher scores them (on_policy with lmbda = 1)

Ways take turns step by step, in a rotating order, so that load on a shared machine hits all
alike; figures are medians. With lmbda < 1 an on_policy step costs lmbda x the on_policy
micro-batch + (1 - lmbda) x the kd_logits one. Run with OMP_NUM_THREADS=1 on a shared machine.

    python bench/on_policy_step.py [--steps 12] [--rows 32] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.training.config import DeriveStudentConfig, TrainingConfig  # noqa: E402
from distillflow.training.data import encode_example  # noqa: E402
from distillflow.training.model import (  # noqa: E402
    DistillationModel,
    derive_student,
    load_teacher,
    load_tokenizer,
)
from distillflow.training.on_policy import micro_batch, sampling_generator, student_answer_rows  # noqa: E402

TEACHER = ROOT / "distillflow" / "assets" / "demo-teacher"
SEEDS = ROOT / "prompts" / "seeds" / "skills.jsonl"
DEMO_STUDENT = DeriveStudentConfig(layer_stride=None, num_layers=2, hidden_size=96, num_attention_heads=3, intermediate_size=256)


def demo_rows(tokenizer, count: int) -> list[dict]:
    import numpy as np

    rows = []
    for line in SEEDS.read_text(encoding="utf-8").splitlines()[:count]:
        seed = json.loads(line)
        example = encode_example(tokenizer, seed["prompt"], seed["reference"], max_length=256)
        rows.append({key: np.asarray(value, dtype=np.int64) for key, value in example.items()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    tokenizer = load_tokenizer(TEACHER)
    teacher = load_teacher(TEACHER)
    rows = demo_rows(tokenizer, args.rows)
    scratch = Path(tempfile.mkdtemp())
    settings = {"dataset_dir": scratch, "output_dir": scratch, "teacher": TEACHER, "derive_student": DEMO_STUDENT,
                "max_length": 256, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "alpha": 0.5}
    models, optimizers = {}, {}
    for way, objective in (("kd_logits", "kd_logits"), ("sft", "sft"), ("on_policy", "on_policy")):
        config = TrainingConfig(objective=objective, lmbda=1.0, divergence="reverse_kl", **settings)
        student = derive_student(TEACHER, DEMO_STUDENT, seed=0)
        student.config.use_cache = False
        models[way] = (DistillationModel(student, config, len(tokenizer), teacher), config)
        optimizers[way] = torch.optim.AdamW(models[way][0].parameters(), lr=3e-3)
    stop_ids = {tokenizer.eos_token_id}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    times: dict[str, list[float]] = {way: [] for way in models}
    sampling: list[float] = []
    answer_tokens: list[float] = []
    ways = list(models)
    for step in range(args.steps + 1):  # step 0 warms up every way and is not counted
        for way in ways[step % len(ways):] + ways[: step % len(ways)]:
            model, config = models[way]
            started = time.perf_counter()
            if way == "on_policy":
                batch_rows = student_answer_rows(
                    model.student, rows, max_new_tokens=config.max_new_tokens, max_length=config.max_length,
                    temperature=1.0, stop_ids=stop_ids, pad_id=pad_id,
                    generator=sampling_generator(0, step, 0, 0), vocab_size=len(tokenizer),
                )
                sampled = time.perf_counter()
                batch = micro_batch(batch_rows, pad_id, True, None)
            else:
                batch = micro_batch(rows, pad_id, False, None)
            sums = model(batch)  # (4,) sums: total, kd, ce, hidden
            optimizers[way].zero_grad()
            (sums[0] / batch.num_supervised).backward()
            optimizers[way].step()
            if step:
                times[way].append(time.perf_counter() - started)
                if way == "on_policy":
                    sampling.append(sampled - started)
                    answer_tokens.append(batch.num_supervised / len(rows))

    baseline = statistics.median(times["kd_logits"])
    print(f"demo teacher + derived demo student, {args.rows} rows per micro-batch, median of {args.steps} steps")
    for way in ways:
        median = statistics.median(times[way])
        print(f"  {way:10s} {median * 1000:8.1f} ms/micro-batch  {median / baseline:5.2f}x kd_logits")
    print(f"  on_policy sampling: {statistics.median(sampling) * 1000:.1f} ms "
          f"({statistics.median(sampling) / statistics.median(times['on_policy']):.0%} of its micro-batch); "
          f"sampled answers: {statistics.mean(answer_tokens):.1f} tokens on average "
          f"(dataset answers: {sum(int((r['labels'][1:] != -100).sum()) for r in rows) / len(rows):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

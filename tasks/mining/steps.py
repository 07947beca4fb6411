"""Hard-prompt mining: candidates around a dataset, scored by how far the student is from
the teacher, the hardest kept as a new version of the dataset.

1. candidates — the project's generators (edge-case, adversarial, evolve, self-instruct)
   seeded with the dataset's prompts, then the build's prompt filters over dataset +
   candidates, dataset first, so a candidate that duplicates a dataset row (exactly or
   nearly) is dropped;
2. the teacher answers them (in the flow: the build's teacher client, ledger and response
   filters, so an answer is paid once, whether mined now or used later);
3. `score_candidates`: the student's distance from the teacher on each answered candidate;
4. `select_candidates`: the hardest (a cap per kind) or, as a control, a random draw;
5. `write_mined_dataset`: the parent's shards + one shard of mined rows (`strategy:
   mined:<kind>`, `parent_id`, `mining_score`), every scored candidate in
   candidates.parquet, manifest last.
"""

from __future__ import annotations

import math
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillflow.config import ConfigError, DistillConfig, mining_dirs
from distillflow.records import PromptRecord, Reject
from distillflow.runs import get_run_logger
from distillflow.storage.ledger import Ledger
from distillflow.tasks.mining.config import MiningConfig
from distillflow.tasks.teacher.recording import answer_requests

MINED_SHARD = "part-mined-00000.parquet"
CANDIDATES_FILE = "candidates.parquet"
STAGING = ".staging-mined"


@dataclass
class MiningPlan:
    """The `mining:` section with its defaults resolved against the rest of the config."""

    mining: MiningConfig
    dataset_dir: Path
    output_dir: Path
    student: Path
    teacher_dir: Path | None  # an in-process teacher (for kl); None for an endpoint
    score: str  # ce | kl | disagreement
    train_output_dir: Path | None
    eval_output_dir: Path | None
    system_prompt: str | None
    max_length: int
    chat_template: str | None = None  # the student's (training.chat_template); None: its tokenizer's own
    chat_template_stop: list[str] | None = None  # where its turn ends (training.chat_template_stop); None: the preset's


def plan_mining(config: DistillConfig, source: str = "<config>") -> MiningPlan:
    """Resolve and check everything before any work: files exist, the score is possible."""
    mining = config.mining
    if mining is None:
        raise ConfigError(f"{source}: no `mining:` section; add one (see docs/mining.md)")
    training = config.training
    dataset_dir, output_dir = mining_dirs(config)  # the config's own rules were checked when it loaded
    if not (dataset_dir / "data").is_dir():
        raise ConfigError(f"{source}: mining: dataset {dataset_dir} has no data/; run `distill build` first")
    assert mining.student is not None or training is not None  # checked when the config loaded
    student = mining.student or Path(training.output_dir) / "final"
    if not (Path(student) / "config.json").is_file():
        raise ConfigError(
            f"{source}: mining.student {student} is not a model directory (no config.json); train the "
            "student first (distill train) or point mining.student at one"
        )
    teacher_dir = Path(config.teacher.model) if config.teacher.backend == "local" else None
    score = mining.score
    white_box = training is not None and training.is_white_box
    if score == "auto":
        score = "kl" if white_box and teacher_dir is not None else "ce"
    train_output_dir = None
    if training is not None and mining.retrain != "none":
        train_output_dir = Path(mining.train_output_dir or f"{training.output_dir}-mined")
    eval_output_dir = None
    if config.evaluation is not None and train_output_dir is not None:
        eval_output_dir = Path(mining.eval_output_dir or f"{config.evaluation.output_dir}-mined")
    system_prompt = training.system_prompt if training is not None else config.teacher.system_prompt
    max_length = training.max_length if training is not None else 2048
    chat_template = training.chat_template if training is not None else config.chat_template
    chat_template_stop = training.chat_template_stop if training is not None else config.chat_template_stop
    return MiningPlan(
        mining, dataset_dir, output_dir, Path(student), teacher_dir, score, train_output_dir, eval_output_dir,
        system_prompt, max_length, chat_template, chat_template_stop,
    )


# -- 1. candidates --------------------------------------------------------------------------


def dataset_records(dataset_dir: Path) -> list[PromptRecord]:
    """The dataset's rows as prompt records (they seed the candidate generators)."""
    from distillflow.storage.parquet import read_table

    table = read_table(dataset_dir / "data", columns=["id", "prompt", "strategy"])
    return [PromptRecord(id=str(i), prompt=p, strategy=s or "seed") for i, p, s in zip(*(table.column(c).to_pylist() for c in ("id", "prompt", "strategy")))]


def generate_candidates(
    config: DistillConfig, mining: MiningConfig, records: list[PromptRecord], complete: Any
) -> tuple[list[PromptRecord], dict[str, Any]]:
    """New prompts around `records`, none a duplicate of a dataset row; their counts."""
    from distillflow.prompts.generate import generate_prompts
    from distillflow.tasks.filters.passes import filter_prompts

    prompts_config = config.prompts.model_copy(
        update={
            "num_prompts": mining.candidates,
            "strategies": {"seed": 0.0, **mining.strategies},
            "random_seed": mining.random_seed,
        }
    )
    seeds = [PromptRecord(id=r.id, prompt=r.prompt, strategy="seed") for r in records]
    generated, generation_rejects, _ = generate_prompts(seeds, prompts_config, complete)
    generated = [p for p in generated if p.strategy != "seed"]
    # The build's prompt filters over dataset + candidates, dataset first: the first copy is
    # kept, so a candidate that repeats (or nearly repeats) a dataset row is the one dropped.
    kept, rejects = filter_prompts(records + generated, config.filters)
    known = {r.id for r in records}
    candidates = [p for p in kept if p.id not in known and p.parent_id is not None]
    dropped = Counter(r.reason for r in rejects if r.id not in known)
    return candidates, {
        "generated": len(generated),
        "generation_rejects": len(generation_rejects),
        "dropped_by_prompt_filters": dict(sorted(dropped.items())),
        "candidates": len(candidates),
    }


# -- 3. scores ------------------------------------------------------------------------------


def _encode(
    tokenizer: Any, rows: list[dict[str, Any]], system_prompt: str | None, max_length: int, chat_template: str | None = None
) -> list[dict[str, Any]]:
    from distillflow.training.chat_template import chat_template_text
    from distillflow.training.data import encode_example

    template = chat_template_text(chat_template) if chat_template else None
    return [encode_example(tokenizer, row["prompt"], row["response"], system_prompt, max_length, template) for row in rows]


def per_token_divergence(
    student: Any, teacher: Any | None, encoded: list[dict[str, Any]], pad_id: int, batch_size: int
) -> list[float]:
    """Mean over each answer's tokens of the student's cross-entropy on the answer (teacher
    None) or of KL(teacher || student) at each answer position (teacher given)."""
    import torch
    import torch.nn.functional as F

    from distillflow.training.data import IGNORE_INDEX, right_padded

    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            input_ids, labels, mask = right_padded(encoded[start : start + batch_size], pad_id)
            logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()  # (B, L-1, V)
            targets = labels[:, 1:]  # (B, L-1): the output at t-1 predicts labels[t]
            counted = targets != IGNORE_INDEX
            if teacher is None:
                per_token = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
                ).view(targets.shape)
            else:
                teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # padded embedding rows trimmed
                teacher_logp = F.log_softmax(teacher_logits[..., :vocab], dim=-1)
                student_logp = F.log_softmax(logits[..., :vocab], dim=-1)
                per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, L-1)
            for row in range(len(input_ids)):
                tokens = int(counted[row].sum())
                scores.append(float(per_token[row][counted[row]].sum()) / tokens if tokens else 0.0)
    return scores


def score_candidates(plan: MiningPlan, rows: list[dict[str, Any]], log: Any = print) -> list[float]:
    """How far the student is from the teacher on each answered candidate (higher = harder)."""
    if not rows:
        return []
    from distillflow.training.model import load_causal_lm
    from distillflow.training.vocabulary import load_tokenizer, vocabulary_preflight

    batch_size = plan.mining.batch_size
    if plan.score == "disagreement":
        from distillflow.tasks.evaluation.checks import token_f1
        from distillflow.tasks.evaluation.models import InProcessModel

        max_tokens = max(8, min(512, max(len(row["response"]) for row in rows)))
        model = InProcessModel(
            plan.student, max_tokens, batch_size, "cpu", plan.system_prompt, plan.chat_template, plan.chat_template_stop
        )
        try:
            answers = model.answer([row["prompt"] for row in rows])
        finally:
            model.close()
        return [1.0 - token_f1(answer.text or "", row["response"]) for answer, row in zip(answers, rows)]

    tokenizer = load_tokenizer(plan.student)
    student = load_causal_lm(plan.student).eval()
    teacher = None
    if plan.score == "kl":
        teacher_tokenizer = load_tokenizer(plan.teacher_dir)  # type: ignore[arg-type]
        teacher = load_causal_lm(plan.teacher_dir).eval()  # type: ignore[arg-type]
        vocabulary_preflight(
            teacher_tokenizer, tokenizer, teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = _encode(tokenizer, rows, plan.system_prompt, plan.max_length, plan.chat_template)
    log(f"scoring {len(rows)} candidates ({plan.score}) with the student {plan.student}")
    return per_token_divergence(student, teacher, encoded, pad, batch_size)


# -- 4. selection ---------------------------------------------------------------------------


def select_candidates(
    rows: list[dict[str, Any]], scores: list[float], keep: int, max_share_per_kind: float, selection: str, seed: int
) -> list[int]:
    """Indices of the rows to add, hardest first (or a seeded random draw of the same size).

    Hardest: the top scores, at most ceil(max_share_per_kind * keep) of one kind
    (`strategy`); when the caps leave places empty, they go to the next-hardest rows of any
    kind, so the count is always min(keep, len(rows))."""
    count = min(keep, len(rows))
    if selection == "random":
        return sorted(random.Random(seed).sample(range(len(rows)), count))
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]["id"]))  # ties: by id, stable
    cap = max(1, math.ceil(max_share_per_kind * keep))
    taken: Counter[str] = Counter()
    chosen: list[int] = []
    for index in order:
        kind = rows[index]["strategy"]
        if taken[kind] < cap:
            chosen.append(index)
            taken[kind] += 1
        if len(chosen) == count:
            return chosen
    chosen_set = set(chosen)
    chosen += [i for i in order if i not in chosen_set][: count - len(chosen)]
    return chosen


# -- 5. the new dataset version -------------------------------------------------------------


def mined_row(row: dict[str, Any], score: float) -> dict[str, Any]:
    return {**row, "strategy": f"mined:{row['strategy']}", "mining_score": float(score)}


def write_mined_dataset(
    plan: MiningPlan,
    rows: list[dict[str, Any]],
    scores: list[float],
    chosen: list[int],
    rejects: list[Reject],
    summary: dict[str, Any],
    secrets: list[str],
) -> dict[str, Any]:
    """The parent's data shards + a shard of the chosen rows; candidates.parquet with every
    scored candidate (chosen or not, nothing paid for is dropped); rejects; manifest last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillflow.storage.dataset import count_by, finish_dataset
    from distillflow.storage.manifest import load_manifest, mined_manifest, remove_manifest
    from distillflow.storage.parquet import (
        REJECT_SCHEMA,
        ShardInfo,
        file_sha256,
        list_shards,
        write_table_atomic,
    )
    from distillflow.training.data import data_fingerprint

    parent = plan.dataset_dir
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_manifest(out)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    (staging / "rejects").mkdir(parents=True)
    parent_shards = list_shards(parent / "data")
    for shard in parent_shards:
        shutil.copy2(shard, staging / "data" / shard.name)
    schema = pq.read_schema(parent_shards[0])
    chosen_rows = [mined_row(rows[i], scores[i]) for i in chosen]
    if chosen_rows:
        # The parent's columns and types (top-k columns excepted: capture-logits adds them),
        # plus the score.
        fields = [f for f in schema if not f.name.startswith("teacher_topk") and f.name not in ("topk_k", "topk_model")]
        names = [f.name for f in fields]
        columns = {name: [row.get(name) for row in chosen_rows] for name in names}
        table = pa.table(columns, schema=pa.schema(fields).remove_metadata())
        table = table.append_column("mining_score", pa.array([row["mining_score"] for row in chosen_rows], pa.float64()))
        write_table_atomic(table, staging / "data" / MINED_SHARD)
    candidate_table = pa.table(
        {
            "id": [row["id"] for row in rows],
            "prompt": [row["prompt"] for row in rows],
            "response": [row["response"] for row in rows],
            "strategy": [row["strategy"] for row in rows],
            "parent_id": [row["parent_id"] for row in rows],
            "score": pa.array(scores, pa.float64()),
            "selected": [i in set(chosen) for i in range(len(rows))],
        }
    )
    write_table_atomic(candidate_table, staging / CANDIDATES_FILE)
    reject_rows = [r.to_row() for r in rejects]
    write_table_atomic(pa.Table.from_pylist(reject_rows, schema=REJECT_SCHEMA), staging / "rejects" / "part-00000.parquet")

    parent_manifest = load_manifest(parent)
    shards = [
        ShardInfo(f"data/{p.name}", pq.read_metadata(p).num_rows, p.stat().st_size, file_sha256(p)).to_dict()
        for p in list_shards(staging / "data")
    ]
    parent_rows = sum(pq.read_metadata(p).num_rows for p in parent_shards)
    selected_scores = [scores[i] for i in chosen]
    manifest = mined_manifest(parent_manifest, Path(parent), parent_rows, count_by(chosen_rows, "strategy"), {
        **summary,
        "parent": {"dir": str(parent), "data_fingerprint": data_fingerprint(parent), "rows": parent_rows},
        "student": str(plan.student),
        "score": plan.score,
        "selection": plan.mining.selection,
        "kept": len(chosen_rows),
        "kept_per_kind": dict(sorted(Counter(row["strategy"] for row in chosen_rows).items())),
        "mean_score_all": sum(scores) / len(scores) if scores else None,
        "mean_score_kept": sum(selected_scores) / len(selected_scores) if selected_scores else None,
        "candidates_file": CANDIDATES_FILE,
        "rejects": dict(sorted(Counter(r.reason for r in rejects).items())),
    })
    card = (
        f"# {parent_manifest.name}-mined\n\nA version of `{parent}` with {len(chosen_rows)} mined rows "
        f"(`strategy: mined:<kind>`, score `{plan.score}`, selection `{plan.mining.selection}`) added to its "
        f"{parent_rows} rows. Every scored candidate, kept or not, is in `{CANDIDATES_FILE}`.\n"
    )
    shards = {"data": shards, "rejects": [{"path": "rejects/part-00000.parquet", "rows": len(reject_rows)}]}
    return finish_dataset(out, staging, shards, manifest, card, secrets, parts=("data", "rejects", CANDIDATES_FILE))


# -- Prefect tasks (wired by flows/) --------------------------------------------------------


@task(name="mine-candidates", cache_policy=NO_CACHE)
def candidates_task(config: DistillConfig, plan: MiningPlan, teacher: Any, ledger: Ledger):
    records = dataset_records(plan.dataset_dir)

    def complete(messages_list: list[list[dict]]):
        return [answer for answer, _ in answer_requests(teacher, ledger, messages_list)]

    return generate_candidates(config, plan.mining, records, complete)


@task(name="mine-score", cache_policy=NO_CACHE)
def score_task(plan: MiningPlan, rows: list[dict[str, Any]]) -> list[float]:
    return score_candidates(plan, rows, log=get_run_logger().info)


@task(name="mine-write", cache_policy=NO_CACHE)
def write_task(plan: MiningPlan, rows, scores, chosen, rejects, summary, secrets) -> dict[str, Any]:
    return write_mined_dataset(plan, rows, scores, chosen, rejects, summary, secrets)

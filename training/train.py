"""Student training with DeepSpeed ZeRO: `python -m distillflow.training.train --config CONFIG.yaml`.

Reads top to bottom: environment → models → data → DeepSpeed engine → resume → loop →
export. Runs under plain python (one process), torchrun, or the `deepspeed` launcher.

Loss normalisation: every micro-batch returns loss *sums* over its supervised tokens; the
step divides by the supervised-token count of the whole optimizer step (all micro-batches of
all processes, known up front from the labels), then undoes DeepSpeed's own 1/accumulation
and 1/world averaging. The optimized loss is therefore the exact per-token mean of the global
batch, whatever the number of processes, accumulation steps or sequence lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Must be set before deepspeed is imported: pick the CPU accelerator when there is no GPU.
if "DS_ACCELERATOR" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover
        pass
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from distillflow.config import load_training_config
from distillflow.failures import DiskWriteError
from distillflow.training.checkpoints import COMPLETE, incomplete_checkpoints, resume_tag, save_checkpoint
from distillflow.training.chat_template import chat_template_text, template_stops, turn_stops
from distillflow.training.config import TrainingConfig, check_sampled_capture
from distillflow.training.data import (
    attach_topk,
    capture_method,
    collate,
    pack_examples,
    supervised_count,
    tokenize_dataset,
)
from distillflow.training.greybox import attach_greybox
from distillflow.training.on_policy import (
    ON_POLICY_LEDGER,
    ServerTeacher,
    TurnEnd,
    generation_weights,
    micro_batch,
    sampling_generator,
    student_answer_rows,
    student_answers_wanted,
)
from distillflow.training.model import (
    DistillationModel, calibration_rows, derive_student, load_causal_lm, load_teacher,
)  # fmt: skip
from distillflow.training.vocabulary import load_tokenizer, topk_preflight, vocabulary_preflight


class TrainingError(RuntimeError):
    """A problem the user can fix; printed as one paragraph, exit code 1."""


# --------------------------------------------------------------------------------------
# Config and environment
# --------------------------------------------------------------------------------------


def single_process_defaults() -> None:
    """Plain `python -m distillflow.training.train`: act as rank 0 of a world of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))


def init_distributed() -> tuple[int, int]:
    """deepspeed.init_distributed with gloo on CPU (nccl on GPU); returns (rank, world)."""
    import deepspeed

    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    if on_cpu and os.environ.get("DISTILLFLOW_SHM_COMM", "0") != "1":
        # DeepSpeed's shared-memory all-reduce is a C++ op compiled on first use (35 s to
        # several minutes on 2 cores). gloo alone is correct, only slower for large
        # all-reduces, so CPU runs skip it unless DISTILLFLOW_SHM_COMM=1.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(config: TrainingConfig, world: int) -> dict[str, Any]:
    """The JSON file, with the values this config owns filled in."""
    path = Path(config.deepspeed_config)
    if not path.is_file():
        raise TrainingError(
            f"deepspeed_config {path} not found; use one of configs/deepspeed/*.json "
            "(zero1, zero2, zero3, zero2_offload_optimizer, zero3_offload)"
        )
    ds = json.loads(path.read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    ds["train_batch_size"] = config.micro_batch_size * config.gradient_accumulation_steps * world
    ds["bf16"] = {"enabled": config.dtype == "bfloat16"}
    ds.pop("fp16", None)
    ds.pop("optimizer", None)  # the optimizer is a torch.optim.AdamW built here (no C++ build)
    ds.pop("scheduler", None)
    if config.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = config.zero_stage
    return ds


# --------------------------------------------------------------------------------------
# Schedule: which rows each process sees at each step (a pure function of the step)
# --------------------------------------------------------------------------------------


def step_rows(step: int, num_rows: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of optimizer step `step`: a window of the endless stream of epochs, each a
    fresh permutation (seeded by seed + epoch). Resuming at step s replays the same rows."""
    start = step * global_batch
    first_epoch, last_epoch = start // num_rows, (start + global_batch - 1) // num_rows
    stream = np.concatenate(
        [np.random.default_rng(seed + epoch).permutation(num_rows) for epoch in range(first_epoch, last_epoch + 1)]
    )
    offset = start - first_epoch * num_rows
    return stream[offset : offset + global_batch]


def micro_batches(rows: np.ndarray, micro: int, world: int, rank: int) -> list[np.ndarray]:
    """Split one global batch: micro-step m of rank r takes rows [(m * world + r) * micro, +micro)."""
    steps = len(rows) // (micro * world)
    return [rows[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(steps)]


def learning_rate_factor(step: int, config: TrainingConfig, total_steps: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def train(config: TrainingConfig) -> dict[str, Any]:
    import deepspeed

    rank, world = init_distributed()
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32

    def log(message: str) -> None:
        if rank == 0:
            print(f"[train] {message}", flush=True)

    # 1. Models. The teacher is loaded first and never handed to the student's engine.
    teacher = teacher_tokenizer = None
    if config.teacher is not None and config.teacher_in_process:
        teacher = load_teacher(config.teacher, dtype)
    if config.teacher is not None:
        teacher_tokenizer = load_tokenizer(config.teacher)
    if config.student is not None:
        student = load_causal_lm(config.student, dtype)
        student_tokenizer = load_tokenizer(config.student)
    else:
        student_tokenizer = teacher_tokenizer
    if config.chat_template is not None:
        # Saved with the exported student, and part of the tokenised-cache key.
        student_tokenizer.chat_template = chat_template_text(config.chat_template)
    cache_dir = config.tokenized_cache_dir or output_dir / "tokenized"
    holdout = config.holdout_fraction or 0.0  # rows of the held-out split are never trained on
    if config.student is None:
        calibration = None
        if config.derive_student.prunes_mlp:  # neuron importance on training rows (cached: read again below)
            calibration = calibration_rows(tokenize_dataset(
                config.dataset_dir, student_tokenizer, config.system_prompt, config.max_length, cache_dir, holdout
            ))  # fmt: skip
        student = derive_student(config.teacher, config.derive_student, config.seed, calibration).to(dtype)
    student.config.use_cache = False
    student_rows = student.get_output_embeddings().weight.shape[0]
    vocab_size = None
    if config.is_white_box and teacher_tokenizer is not None:
        teacher_rows = (
            teacher.get_output_embeddings().weight.shape[0] if teacher is not None else student_rows
        )
        vocab_size = vocabulary_preflight(teacher_tokenizer, student_tokenizer, teacher_rows, student_rows)
    elif config.objective == "kd_greybox":  # targets are student ids (training/greybox.py): any teacher
        vocab_size = min(len(student_tokenizer), student_rows)
    elif config.is_white_box:  # kd_topk without a teacher directory: ids are range-checked only
        vocab_size = len(student_tokenizer)
        log(
            "warning: no `teacher` given, so the teacher's tokenizer cannot be compared with the "
            "student's; set training.teacher (a model or tokenizer directory) to check it"
        )
    parameters = sum(p.numel() for p in student.parameters())
    log(f"student: {parameters:,} parameters; objective {config.objective}; {world} process(es)")

    # 2. Data: tokenised once (cached), optionally packed; every rank holds the row list.
    examples = tokenize_dataset(
        config.dataset_dir, student_tokenizer, config.system_prompt, config.max_length, cache_dir, holdout
    )
    if config.objective == "kd_topk":
        if capture_method(config.dataset_dir) == "sampled":
            check_sampled_capture(config.temperature, config.divergence)
        attach_topk(examples, config.dataset_dir, config.topk_column, holdout)
        topk_preflight(max(int(e["topk_ids"].max(initial=0)) for e in examples), vocab_size)
    coverage = None
    if config.objective == "kd_greybox":
        # The build's API logprobs, aligned to the student's tokens (computed again on a resume:
        # a pure function of the data and the tokenizer).
        coverage = attach_greybox(
            examples, config.dataset_dir, student_tokenizer, config.system_prompt,
            student_tokenizer.chat_template, holdout,
        )
        log(f"grey-box targets: {coverage.summary()}")
    rows = pack_examples(examples, config.max_length) if config.packing else examples
    rows = [row for row in rows if supervised_count(row) > 0] if not config.packing else rows
    if not rows:
        raise TrainingError(f"{config.dataset_dir}: no example has a response token to train on")
    global_batch = config.micro_batch_size * config.gradient_accumulation_steps * world
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(rows) / global_batch))
    pad_id = student_tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else student_tokenizer.eos_token_id
    log(f"data: {len(examples)} examples → {len(rows)} rows; {total_steps} steps of {global_batch} rows")
    server_teacher = None
    if config.objective == "on_policy" and config.teacher_server is not None:
        server_teacher = ServerTeacher(config.teacher_server, output_dir / ON_POLICY_LEDGER)
    # on_policy: a sampled answer ends at the tokenizer's eos or the model's own eos id(s).
    stop_ids = {student_tokenizer.eos_token_id} | set(_as_list(student.generation_config.eos_token_id))
    stop_ids.discard(None)
    # … or where its text starts the template's next turn (a base model's `plain` template).
    stops = turn_stops(config.chat_template, config.chat_template_stop) or template_stops(student_tokenizer.chat_template)
    turn_end = TurnEnd(stops, student_tokenizer.decode, student_tokenizer.eos_token_id) if (
        stops and config.objective == "on_policy" and student_tokenizer.eos_token_id is not None) else None

    # 3. DeepSpeed engine around student (+ projections); a torch AdamW (no C++ optimizer).
    if teacher is not None and config.teacher_zero3_inference:
        inference = json.loads(Path(config.teacher_deepspeed_config).read_text(encoding="utf-8"))
        inference["train_micro_batch_size_per_gpu"] = config.micro_batch_size
        inference["gradient_accumulation_steps"] = 1
        inference["train_batch_size"] = config.micro_batch_size * world
        inference["bf16"] = {"enabled": config.dtype == "bfloat16"}
        teacher_engine, *_ = deepspeed.initialize(model=teacher, config=inference)
        teacher_engine.module.eval()
        teacher = teacher_engine.module
    model = DistillationModel(student, config, vocab_size, teacher)
    ds_config = deepspeed_config(config, world)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # The loss reads lm_head.weight outside lm_head.forward: ZeRO-3 must gather it for
        # the forward and backward of the whole model.
        deepspeed.zero.register_external_parameter(model, student.get_output_embeddings().weight)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config, total_steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
    )

    # 4. Resume: the step index alone decides the data, so the loss curve continues exactly.
    start_step = 0
    metrics_path = output_dir / "metrics.jsonl"
    # Only a checkpoint with its completion marker (written last) is taken (training/checkpoints.py).
    tag = resume_tag(checkpoint_dir) if config.resume else None
    for partial in incomplete_checkpoints(checkpoint_dir) if config.resume else []:
        log(f"ignoring {partial}: its save was cut short (no {COMPLETE})")
    if tag is not None:
        loaded, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        if loaded is None:
            raise TrainingError(f"could not load the checkpoint in {checkpoint_dir}; delete it to start over")
        start_step = int(client_state["step"])
        log(f"resumed from {loaded} at step {start_step}")
    loss = float("nan")
    if rank == 0:
        loss = _truncate_metrics(metrics_path, start_step)
        if start_step >= total_steps:
            log(f"already trained to step {start_step}/{total_steps}; exporting the student again")

    # 5. Loop: one optimizer step = gradient_accumulation_steps micro-batches per process.
    started = time.time()
    tokens_seen = 0
    engine.train()
    for step in range(start_step, total_steps):
        global_indices = step_rows(step, len(rows), global_batch, config.seed)
        lr = scheduler.get_last_lr()[0]
        sums = torch.zeros(4, dtype=torch.float64)
        own_micro_batches = micro_batches(global_indices, config.micro_batch_size, world, rank)
        if config.objective == "on_policy":
            # Student answers change the token count, so it is counted after sampling.
            batches, tokens = on_policy_batches(
                engine, student, [[rows[i] for i in indices] for indices in own_micro_batches],
                config, step, rank, pad_id, stop_ids, vocab_size, server_teacher, turn_end,
            )
            counts = torch.tensor(
                [sum(b.num_supervised for b in batches), tokens,
                 sum(len(b.input_ids) for b in batches if b.student_generated)], dtype=torch.float64,
            )
            torch.distributed.all_reduce(counts)
            global_supervised, global_tokens, sampled_rows = (int(count) for count in counts)
        else:
            batches = (collate([rows[i] for i in indices], pad_id) for indices in own_micro_batches)
            global_supervised = sum(supervised_count(rows[i]) for i in global_indices)
            global_tokens = sum(len(rows[i]["input_ids"]) for i in global_indices)
        scale = config.gradient_accumulation_steps * world / max(1, global_supervised)
        for batch in batches:
            micro_sums = engine(batch)  # (4,) sums: total, kd, ce, hidden
            engine.backward(micro_sums[0] * scale)
            engine.step()
            sums += micro_sums.detach().double()
        torch.distributed.all_reduce(sums)
        total, kd, ce, hidden = (sums / max(1, global_supervised)).tolist()
        loss = total
        tokens_seen += global_tokens
        if rank == 0:
            record = {
                "step": step + 1,
                "loss": total,
                "kd": kd,
                "ce": ce,
                "hidden": hidden,
                "lr": lr,
                "tokens": global_tokens,
                "supervised_tokens": global_supervised,
                "elapsed_s": round(time.time() - started, 4),
            }
            if config.objective == "on_policy":
                record["student_answer_rows"] = sampled_rows  # rows whose answers the student sampled
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                log(f"step {step + 1}/{total_steps} loss {total:.4f} lr {lr:.2e}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(engine, checkpoint_dir, step + 1, config.keep_checkpoints, rank)
    elapsed = time.time() - started
    if server_teacher is not None:
        log(f"teacher server: {server_teacher.requests_sent} sequences scored, "
            f"{server_teacher.requests_reused} read back from {ON_POLICY_LEDGER}")
        server_teacher.close()
    if start_step < total_steps:
        save_checkpoint(engine, checkpoint_dir, total_steps, config.keep_checkpoints, rank)

    # 6. Export the student alone: save_pretrained + tokenizer (ZeRO-3 weights gathered).
    final_dir = output_dir / "final"
    export_student(engine, student, student_tokenizer, final_dir, rank)
    summary = {
        "final_loss": loss,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and tokens_seen else None,
        "elapsed_s": elapsed,
        "params": parameters,
        "objective": config.objective,
        "world_size": world,
        "final_dir": str(final_dir),
    }
    if coverage is not None:
        summary["greybox_coverage"] = coverage.to_dict()
    if rank == 0:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        log(f"done: final loss {loss:.4f}; student exported to {final_dir}")
    torch.distributed.barrier()
    return summary


def on_policy_batches(
    engine, student, micro_rows: list[list[dict[str, Any]]], config: TrainingConfig, step: int, rank: int,
    pad_id: int, stop_ids: set[int], vocab_size: int | None, server_teacher: ServerTeacher | None,
    turn_end: TurnEnd | None,
) -> tuple[list, int]:
    """This process's micro-batches of one on_policy step, and their tokens (padding aside): a
    share lmbda of them (the same micro-steps on every process) with answers the student samples
    itself, the rest with the dataset's; with a server teacher, each carries its top-k targets."""
    batches, tokens = [], 0
    for micro_step, rows_of_micro in enumerate(micro_rows):
        own = student_answers_wanted(config.seed, step, micro_step, config.lmbda)
        if own:
            with generation_weights(engine):
                rows_of_micro = student_answer_rows(
                    student, rows_of_micro, max_new_tokens=config.max_new_tokens, max_length=config.max_length,
                    temperature=config.sampling_temperature, stop_ids=stop_ids, pad_id=pad_id,
                    generator=sampling_generator(config.seed, step, micro_step, rank), vocab_size=vocab_size,
                    turn_end=turn_end,
                )
        batches.append(micro_batch(rows_of_micro, pad_id, own, server_teacher))
        tokens += sum(len(row["input_ids"]) for row in rows_of_micro)
    return batches, tokens


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _truncate_metrics(path: Path, step: int) -> float:
    """Keep metrics.jsonl lines of steps ≤ step (a resumed run rewrites what follows);
    returns the loss logged at `step` (nan when there is none)."""
    if not path.is_file():
        return float("nan")
    kept = [record for line in path.read_text(encoding="utf-8").splitlines() if line
            and (record := json.loads(line))["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    return float(kept[-1]["loss"]) if kept and kept[-1]["step"] == step else float("nan")


def export_student(engine, student, tokenizer, final_dir: Path, rank: int) -> None:
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            if rank == 0:
                state = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
        if rank == 0:
            student.save_pretrained(str(final_dir), state_dict=state)
    elif rank == 0:
        student.save_pretrained(str(final_dir))
    if rank == 0:
        tokenizer.save_pretrained(str(final_dir))
    torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="distillflow YAML with a `training:` section")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    single_process_defaults()
    try:
        config = load_training_config(args.config)
        train(config)
    except (TrainingError, DiskWriteError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step time of kd_topk vs sft on the same student (forward + backward + AdamW step).

The student is a Llama built from a config (random weights, vocab 32k by default); batches
are synthetic: random token ids, the second half of each row supervised, and teacher top-k
logprobs (k = 20) drawn at random for every supervised token, as `distill capture-logits`
would store them. kd_topk runs at each --temperature (default 2.0, the README's example,
and 1.0, which shares the cross-entropy's softmax), with alpha 0.5, forward KL and the
config's default loss_chunk_tokens. Objectives take turns step by step, in a rotating order,
so that load on a shared machine hits all alike; the figure is the median step time.
Target: kd_topk ≤ 1.15x sft at every temperature. On a machine shared with other jobs, run
with OMP_NUM_THREADS=1: oversubscribed OpenMP threads make step times erratic.

    python bench/kd_step.py [--steps 8] [--temperature 2.0 1.0] [--vocab 32000] [--hidden 256]
                            [--layers 4] [--tokens 1024] [--k 20] [--chunk N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.training.config import TrainingConfig  # noqa: E402
from distillflow.training.data import Batch  # noqa: E402
from distillflow.training.model import DistillationModel  # noqa: E402


def make_student(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False, use_cache=False,
    )
    return LlamaForCausalLM(config)


def make_batch(rows: int, length: int, vocab: int, k: int) -> Batch:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    position_ids = torch.arange(length).expand(rows, length).clone()
    supervised = int((labels[:, 1:] != -100).sum())
    logprobs = torch.log_softmax(torch.randn(supervised, k, generator=generator) * 2, -1) - 0.2  # tail 18%
    logprobs, order = logprobs.sort(-1, descending=True)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(supervised)])
    return Batch(input_ids, labels, position_ids, ids, logprobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per objective")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per batch (rows of 128)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=None, help="loss_chunk_tokens (default: the config's)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[2.0, 1.0],
                        help="KD temperatures to measure (each against the same sft runs)")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    batch = make_batch(max(1, args.tokens // 128), 128, args.vocab, args.k)
    chunk = args.chunk or TrainingConfig.model_fields["loss_chunk_tokens"].default
    runs = {}
    for name, objective, temperature in [("sft", "sft", 1.0)] + [
        (f"kd_topk T={t:g}", "kd_topk", t) for t in args.temperature
    ]:
        config = TrainingConfig(
            dataset_dir=".", output_dir=".", student=".", teacher=".", objective=objective,
            alpha=0.5, temperature=temperature, loss_chunk_tokens=chunk,
        )
        model = DistillationModel(make_student(args.vocab, args.hidden, args.layers), config, args.vocab)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (model, optimizer)

    # Every step runs each objective once, in an order that rotates step by step, so that load
    # on a shared machine (and any cost of coming first) hits all alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in range(args.warmup + args.steps):
        for name in names[step % len(names):] + names[: step % len(names)]:
            model, optimizer = runs[name]
            started = time.perf_counter()
            sums = model(batch)
            (sums[0] / batch.num_supervised).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)

    params = sum(p.numel() for p in runs["sft"][0].parameters())
    print(f"student: {params / 1e6:.1f} M params (hidden {args.hidden}, {args.layers} layers), vocab {args.vocab}, "
          f"{batch.input_ids.numel()} tokens/step ({batch.num_supervised} supervised), k = {args.k}, "
          f"alpha 0.5, forward KL, loss_chunk_tokens {chunk}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    sft = statistics.median(times["sft"])
    for name, values in times.items():
        median = statistics.median(values)
        line = f"  {name:<12}: median {median * 1000:8.1f} ms/step"
        if name != "sft":
            ratio = median / sft
            line += f"   ratio to sft {ratio:.3f}x  (target ≤ 1.15x) {'OK' if ratio <= 1.15 else 'ABOVE TARGET'}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

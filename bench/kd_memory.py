"""Peak memory of the chunked KD loss vs a plain full-vocabulary KL + cross-entropy.

Both compute the same loss, alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE with a
white-box teacher (alpha 0.5, T 2), and its gradients w.r.t. the student hidden states and
lm_head weight, from hidden states and head weights (vocab 32k, hidden 512, float32):

- plain: full (N, V) logits, then F.kl_div(log_softmax(s / T), log_softmax(t / T),
  log_target=True) and F.cross_entropy, as a PyTorch user would write it;
- chunked: training.losses.chunked_distillation_loss at the config's default
  loss_chunk_tokens (what `distill train` runs).

The figure is the peak of live allocations during loss + backward, above what was live
before (inputs, weights): on CPU from the allocation events of the PyTorch profiler (every
allocation and free of torch's allocator, summed in order), on CUDA from
torch.cuda.max_memory_allocated after a reset. Allocator caches, RSS and set-up are not in it.
Variants alternate per token count in one process. Target: chunked ≤ 0.3x plain at 1k-8k tokens.

    python bench/kd_memory.py [--tokens 1024 2048 4096 8192] [--vocab 32000] [--hidden 512] [--chunk N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.training.config import TrainingConfig  # noqa: E402
from distillflow.training.losses import chunked_distillation_loss  # noqa: E402

TEMPERATURE, ALPHA = 2.0, 0.5
MIB = 2**20


def plain_loss(student_hidden, head, teacher_hidden, teacher_head, targets, chunk):
    student_logits = student_hidden @ head.T  # (N, V)
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head.T  # (N, V)
    kd = F.kl_div(
        F.log_softmax(student_logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        reduction="sum",
        log_target=True,
    )
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    return ALPHA * TEMPERATURE**2 * kd + (1 - ALPHA) * ce


def chunked_loss(student_hidden, head, teacher_hidden, teacher_head, targets, chunk):
    return chunked_distillation_loss(
        student_hidden, targets, head, teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head,
        divergence="forward_kl", temperature=TEMPERATURE, alpha=ALPHA, chunk_tokens=chunk,
    ).total


def live_peak(run, device: str) -> tuple[int, torch.Tensor]:
    """Peak bytes of live tensor memory while `run()` executes, above what was live before."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:  # + allocation, - free
        live += nbytes
        peak = max(peak, live)
    return peak, result


def measure(loss_fn, tokens: int, vocab: int, hidden: int, chunk: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_()  # (N, H)
    head = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).to(device).requires_grad_()  # (V, H)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator).to(device)  # (N, H)
    teacher_head = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).to(device)  # (V, H)
    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

    def run():
        loss = loss_fn(student_hidden, head, teacher_hidden, teacher_head, targets, chunk)
        loss.backward()
        return loss.detach()

    peak, loss = live_peak(run, device)
    return {"peak": peak, "loss": float(loss), "grad_hidden": student_hidden.grad, "grad_head": head.grad}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=None, help="loss_chunk_tokens (default: the config's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    chunk = args.chunk or TrainingConfig.model_fields["loss_chunk_tokens"].default

    print(f"KD loss + backward (white-box teacher, forward KL, T {TEMPERATURE:g}, alpha {ALPHA:g}), "
          f"vocab {args.vocab}, hidden {args.hidden}, fp32, {device}, loss_chunk_tokens {chunk}; "
          f"peak live allocations above the inputs")
    print(f"  {'tokens':>6}  {'one (N,V) fp32':>14}  {'plain KL+CE':>12}  {'chunked':>10}  {'ratio':>7}  same loss+grads")
    for tokens in args.tokens:
        plain = measure(plain_loss, tokens, args.vocab, args.hidden, chunk, device)
        ours = measure(chunked_loss, tokens, args.vocab, args.hidden, chunk, device)
        ratio = ours["peak"] / plain["peak"]
        same = (
            abs(plain["loss"] - ours["loss"]) <= 1e-4 * abs(plain["loss"])
            and torch.allclose(plain["grad_hidden"], ours["grad_hidden"], rtol=1e-3, atol=1e-6)
            and torch.allclose(plain["grad_head"], ours["grad_head"], rtol=1e-3, atol=1e-6)
        )
        print(f"  {tokens:>6}  {tokens * args.vocab * 4 / MIB:>10.0f} MiB  {plain['peak'] / MIB:>8.0f} MiB  "
              f"{ours['peak'] / MIB:>6.0f} MiB  {ratio:>6.3f}x  {same}   "
              f"(target ≤ 0.30x) {'OK' if ratio <= 0.3 else 'ABOVE TARGET'}")
        del plain, ours
    return 0


if __name__ == "__main__":
    sys.exit(main())

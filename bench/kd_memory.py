"""Peak memory of the chunked KD loss vs a naive full-vocabulary implementation.

Both compute the same loss (alpha * T^2 * forward KL + (1 - alpha) * CE, white-box teacher)
and its gradients w.r.t. the student hidden states and lm_head weight, at vocab 32k and
1,024 tokens. Each variant runs in a fresh subprocess; on CPU the figure is the growth of
peak RSS during loss + backward (glibc is told to return every large block to the OS, so RSS
follows live memory), on GPU torch.cuda.max_memory_allocated. Target: chunked ≤ 0.3x naive.

    python bench/kd_memory.py [--tokens 1024] [--vocab 32000] [--hidden 512] [--chunk 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, device: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from training.losses import KDSettings, chunk_loss_sums, chunked_distillation_loss

    torch.manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, device=device, requires_grad=True)  # (N, H)
    head = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).requires_grad_()  # (V, H)
    teacher_hidden = torch.randn(tokens, hidden, device=device)  # (N, H)
    teacher_head = torch.randn(vocab, hidden, device=device) * hidden**-0.5  # (V, H)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    settings = KDSettings("forward_kl", 0.5, 2.0, 0.5)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if variant == "naive":
        student_logits = student_hidden @ head.T  # (N, V)
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_head.T  # (N, V)
        loss = chunk_loss_sums(student_logits, targets, teacher_logits, None, None, settings)[0]
    else:
        loss = chunked_distillation_loss(
            student_hidden, targets, head, teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head,
            divergence="forward_kl", temperature=2.0, alpha=0.5, chunk_tokens=chunk,
        ).total
    loss.backward()

    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": variant, "peak_bytes": peak, "loss": float(loss), "grad_norm": float(head.grad.norm())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.variant:  # child process: one measurement, printed as JSON
        print(json.dumps(measure(args.variant, args.tokens, args.vocab, args.hidden, args.chunk, args.device)))
        return 0

    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results = {}
    for variant in ("naive", "chunked"):
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                   "--device", args.device]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    mib = 2**20
    one_logits = args.tokens * args.vocab * 4 / mib
    print(f"KD loss + backward, {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, "
          f"fp32, {args.device} (one [tokens x vocab] fp32 tensor = {one_logits:.0f} MiB)")
    print(f"  naive full-vocabulary : peak +{naive['peak_bytes'] / mib:8.1f} MiB   loss sum {naive['loss']:.6f}")
    print(f"  chunked ({args.chunk:>4} tokens) : peak +{chunked['peak_bytes'] / mib:8.1f} MiB   loss sum {chunked['loss']:.6f}")
    ratio = chunked["peak_bytes"] / naive["peak_bytes"]
    print(f"  ratio chunked / naive : {ratio:.3f}x  (target ≤ 0.30x) {'OK' if ratio <= 0.3 else 'ABOVE TARGET'}")
    same = abs(naive["loss"] - chunked["loss"]) <= 1e-4 * abs(naive["loss"])
    print(f"  same loss and gradient: {same and abs(naive['grad_norm'] - chunked['grad_norm']) <= 1e-3 * naive['grad_norm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

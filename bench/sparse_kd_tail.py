"""How sparse KD should temper the teacher's tail: measured, not assumed.

    python bench/sparse_kd_tail.py             # 3 seeds, T in 1 2 4 8 (about 2 minutes)

A top-k capture keeps the teacher's k largest probabilities; the rest, r = 1 - sum(top-k), is
one "tail" class of the coarse (k + 1)-class distribution the loss compares. At T != 1 the
tempered tail is unknown: it lies between r^(1/T) (r on one token) and (V - k)^(1 - 1/T) r^(1/T)
(r spread evenly). This bench fits a student with shared parameters (one head and bias for
all rows, per-row features) under PURE KD (alpha = 1) to a near-one-hot teacher like the
demo's (top-1 ~0.99+, V = 256, k = 8) with each tail rule, and prints how often the
student's argmax at T = 1 is the teacher's top-1:

    even        (V - k)^(1 - 1/T) r^(1/T)   (the maximum-entropy guess)
    one_token   r^(1/T)                     (what training/losses.py does)
    untempered  r, the top-k tempered within 1 - r

and, for reference, the full-vocabulary KL against the true teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.training.losses import LOG_FLOOR, divergence_from_logprobs, logit_divergence  # noqa: E402

RULES = ("even", "one_token", "untempered", "full_vocabulary")


def near_one_hot_teacher(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) teacher logits with a top-1 probability of ~0.99+, and the top-1 ids (N,)."""
    generator = torch.Generator().manual_seed(seed)
    top1 = torch.randint(0, vocab, (n,), generator=generator)
    logits = torch.randn(n, vocab, generator=generator) * 1.5
    logits[torch.arange(n), top1] += 11.0
    return logits, top1


def coarse_teacher(top_log: torch.Tensor, vocab: int, temperature: float, rule: str) -> torch.Tensor:
    """(N, k) top-k logprobs at T = 1 → (N, k + 1) tempered coarse teacher under `rule`."""
    k = top_log.shape[-1]
    tail = (1 - top_log.double().exp().sum(-1, keepdim=True)).clamp_min(0)
    log_tail = torch.log(tail).clamp_min(LOG_FLOOR).float()
    match rule:
        case "even":
            coarse = torch.cat([top_log / temperature, (1 - 1 / temperature) * math.log(vocab - k) + log_tail / temperature], -1)
        case "one_token":
            coarse = torch.cat([top_log / temperature, log_tail / temperature], -1)
        case "untempered":
            top = F.log_softmax(top_log / temperature, -1) + torch.log1p(-tail.float().clamp_max(1 - 1e-7))
            return torch.cat([top, log_tail], -1)
        case _:
            raise ValueError(rule)
    return coarse - torch.logsumexp(coarse, -1, keepdim=True)


def fit(rule: str, temperature: float, seed: int, n: int = 512, vocab: int = 256, k: int = 8, dim: int = 16,
        steps: int = 400) -> tuple[float, float]:
    """Fit the shared-head student; (share of rows whose argmax is the teacher's top-1, final loss)."""
    teacher_logits, top1 = near_one_hot_teacher(n, vocab, seed)
    top_log, top_ids = F.log_softmax(teacher_logits, -1).topk(k, -1)
    target = None if rule == "full_vocabulary" else coarse_teacher(top_log, vocab, temperature, rule)
    torch.manual_seed(seed)
    features = torch.nn.Parameter(torch.randn(n, dim) * 0.1)  # (N, d)
    head = torch.nn.Parameter(torch.randn(vocab, dim) * 0.1)  # (V, d), shared by every row
    bias = torch.nn.Parameter(torch.zeros(vocab))  # (V,), shared
    optimizer = torch.optim.Adam([features, head, bias], lr=0.05)
    for _ in range(steps):
        logits = features @ head.T + bias  # (N, V)
        if target is None:
            loss = logit_divergence(logits, teacher_logits, "forward_kl", temperature=temperature).mean()
        else:
            student = F.log_softmax(logits / temperature, -1)
            tail = torch.logsumexp(student.scatter(-1, top_ids, float("-inf")), -1, keepdim=True)
            coarse = torch.cat([student.gather(-1, top_ids), tail], -1)
            loss = divergence_from_logprobs(coarse, target, "forward_kl").mean()
        loss = loss * temperature**2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits = (features @ head.T + bias).detach()
    return (logits.argmax(-1) == top1).float().mean().item(), loss.item()


def render(result: dict) -> str:
    """The markdown table of a result (rows: tail rules; columns: temperatures)."""
    temperatures = result["temperatures"]
    lines = ["| tail rule | " + " | ".join(f"T = {t:g}" for t in temperatures) + " |", "|---|" + "---:|" * len(temperatures)]
    for rule, by_temperature in result["agreement"].items():
        cells = [f"{100 * min(values):.1f}–{100 * max(values):.1f} %" for values in by_temperature]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sparse-kd-tail" / "report.json")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)
    torch.set_num_threads(1)
    agreement = {
        rule: [[fit(rule, temperature, seed)[0] for seed in range(args.seeds)] for temperature in args.temperatures]
        for rule in RULES
    }
    result = {"seeds": args.seeds, "temperatures": args.temperatures, "agreement": agreement}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nshare of rows whose student argmax (T = 1) is the teacher's top-1; min–max over {args.seeds} seeds ({args.out})")


if __name__ == "__main__":
    main()

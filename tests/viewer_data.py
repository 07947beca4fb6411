"""A synthetic finished dataset of any size, for the viewer's tests and its size figure.

    python -m tests.viewer_data OUT_DIR --rows 100000

writes OUT_DIR as `distill build` would (data/, rejects/, manifest.json, README.md): 95% of
the rows accepted over 8 strategies, 5% rejects of which half are near-duplicates of an
accepted row; prompts of 30–400 and answers of 40–2,000 characters; `top_logprobs` (top-5
per answer token, as an API teacher returns them) on every accepted row. Seeded: the same
arguments give the same dataset.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from distillflow.storage.dataset import dataset_card, write_dataset

STRATEGIES = ["seed", "edge_case:unicode", "edge_case:long", "adversarial:typo", "adversarial:casing",
              "adversarial:injection", "evolve:deepen", "evolve:concretize"]
WORDS = ("the a of to and in is for on that with as list sort python number prime string explain write why how "
         "what function value error file table compute average reverse word sentence count largest smallest "
         "between two three France Paris capital river mountain history science cell energy light water").split()
TOP_K = 5
TOKENS_PER_ROW = 64  # answer tokens that carry top_logprobs


def _text(rng: np.random.Generator, low: int, high: int) -> str:
    target = int(rng.integers(low, high))
    words = rng.choice(WORDS, size=target // 4 + 2)
    return " ".join(words)[:target]


def _top_logprobs(rng: np.random.Generator, answer: str) -> list[dict]:
    pieces = [" " + word for word in answer.split(" ")[:TOKENS_PER_ROW]]
    probs = -np.sort(-rng.dirichlet(np.full(TOP_K + 1, 0.4), size=len(pieces)), axis=1)[:, :TOP_K]  # (T, k), mass < 1
    logprobs = np.log(np.maximum(probs, 1e-9)).tolist()
    others = rng.choice(WORDS, size=(len(pieces), TOP_K - 1)).tolist()
    chosen = rng.integers(0, 2, size=len(pieces)).tolist()  # the answer's token is the top-1 or the top-2
    out = []
    for piece, row_logprobs, row_others, rank in zip(pieces, logprobs, others, chosen):
        tokens = [" " + word for word in row_others]
        tokens.insert(rank, piece)
        top = [{"token": token, "logprob": logprob} for token, logprob in zip(tokens, row_logprobs)]
        out.append({"token": piece, "logprob": row_logprobs[rank], "top": top})
    return out


def write_synthetic_dataset(root: str | Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    accepted_count = rows - rows // 20
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    accepted = []
    for index in range(accepted_count):
        answer = _text(rng, 40, 2000)
        accepted.append({
            "id": f"row-{index:07d}", "prompt": _text(rng, 30, 400), "response": answer,
            "strategy": STRATEGIES[int(rng.integers(0, len(STRATEGIES)))], "parent_id": None,
            "teacher_model": "synthetic", "finish_reason": "stop", "prompt_tokens": 50, "completion_tokens": 200,
            "created_at": created, "top_logprobs": _top_logprobs(rng, answer),
        })
    rejects = []
    for index in range(rows - accepted_count):
        if index % 2 == 0:
            kept = accepted[int(rng.integers(0, accepted_count))]
            rejects.append({"id": f"dup-{index:07d}", "prompt": kept["prompt"] + " ?", "strategy": kept["strategy"],
                            "reason": "near_duplicate", "detail": "jaccard 0.9", "duplicate_of": kept["id"]})
        else:
            rejects.append({"id": f"rej-{index:07d}", "prompt": _text(rng, 30, 400), "strategy": "seed",
                            "reason": "truncated", "detail": "finish_reason=length", "response": _text(rng, 40, 400)})
    manifest = {
        "name": f"synthetic-{rows}", "distillflow_version": "0.1.0", "created_at": created.isoformat(),
        "config": {"teacher": {"model": "synthetic", "backend": "openai"}},
        "counts": {"accepted": len(accepted), "rejected": len(rejects)},
    }
    write_dataset(root, accepted, rejects, manifest, dataset_card(manifest), with_top_logprobs=True)
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    print(write_synthetic_dataset(arguments.out_dir, arguments.rows, arguments.seed))

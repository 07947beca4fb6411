"""Teacher scoring through an OpenAI-compatible server's prompt logprobs (vLLM).

The completions endpoint scores a list of token ids as given (no re-tokenisation) with
`prompt_logprobs = k`: entry i of the answer's `prompt_logprobs` is the teacher's
distribution that predicts token i (entry 0 is None), as {token id: {"logprob", "rank",
"decoded_token"}} holding the top-k and the actual token, which may rank below k. Used by
`distill capture-logits` (source vllm) and by the on_policy objective's teacher_server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TopK = tuple[np.ndarray, np.ndarray]  # ids int64 (T, k), logprobs float32 (T, k)


def request_prompt_logprobs(client: Any, model: str, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
    """One completions request scoring `sequences` (token-id lists): their `prompt_logprobs`, in order."""
    response = client.completions.create(
        model=model,
        prompt=sequences,  # a list of token-id lists: scored as given, no re-tokenisation
        max_tokens=1,
        temperature=0.0,
        extra_body={"prompt_logprobs": k, "return_tokens_as_token_ids": True},
    )
    choices = sorted(response.choices, key=lambda choice: choice.index)
    if len(choices) != len(sequences):
        raise ValueError(f"the server answered {len(choices)} choices for {len(sequences)} prompts")
    scored = []
    for choice in choices:
        prompt_logprobs = (choice.model_extra or {}).get("prompt_logprobs")
        if prompt_logprobs is None:
            raise ValueError(
                "the server returned no `prompt_logprobs`; it must be vLLM (or another "
                "server that supports prompt_logprobs on the completions endpoint)"
            )
        scored.append(prompt_logprobs)
    return scored


def prompt_logprobs_to_topk(prompt_logprobs: list[dict | None], targets: np.ndarray, k: int) -> TopK:
    """(T, k) top-k of vLLM `prompt_logprobs` at the target indices.

    Entry i maps token id (a string key in JSON) → {"logprob", "rank", "decoded_token"}; it
    holds the top-k and also the actual prompt token, which may rank below k.
    """
    ids = np.empty((len(targets), k), dtype=np.int64)
    logprobs = np.empty((len(targets), k), dtype=np.float32)
    for t, index in enumerate(targets):
        entry = prompt_logprobs[index] if index < len(prompt_logprobs) else None
        if not entry:
            raise ValueError(f"the server returned no prompt logprobs for token {index}")
        candidates = sorted(
            ((int(token_id), float(item["logprob"]), item.get("rank") or 0) for token_id, item in entry.items()),
            key=lambda candidate: (-candidate[1], candidate[2]),
        )[:k]
        if len(candidates) < k:
            raise ValueError(
                f"the server returned {len(candidates)} prompt logprobs for token {index}, fewer "
                f"than k = {k}; start vLLM with --max-logprobs {k} or more"
            )
        ids[t] = [candidate[0] for candidate in candidates]
        logprobs[t] = [candidate[1] for candidate in candidates]
    return ids, logprobs

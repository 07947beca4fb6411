"""What the Prefect UI's artifact pages show at a glance: markdown summaries with charts
embedded as PNG `data:` URIs (a markdown artifact then needs no file server), for the build
(counts per stage, reject reason and strategy, teacher tokens and cost, length histograms)
and for training (the loss curve). Plain functions: no Prefect here."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from distillflow.storage.manifest import Manifest

PROMPT_COLOR, RESPONSE_COLOR = "#4C72B0", "#DD8452"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(width: float = 7.5, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def length_histograms_png(prompt_chars: list[int], response_chars: list[int], bins: int = 30) -> bytes:
    """Two histograms side by side: prompt and response length in characters."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8.0, 2.8))
    for axis, values, title, color in (
        (axes[0], prompt_chars, "prompt length (chars)", PROMPT_COLOR),
        (axes[1], response_chars, "response length (chars)", RESPONSE_COLOR),
    ):
        if values:
            axis.hist(values, bins=min(bins, max(1, len(set(values)))), color=color)
        axis.set_title(f"{title}, {len(values)} rows", fontsize=10)
        axis.set_ylabel("rows")
    return _png(figure)


def loss_curve_png(steps: list[dict[str, Any]]) -> bytes:
    """Loss per optimizer step (and its KD / CE parts when logged)."""
    figure, axis = _figure()
    for column, style in (("loss", "-"), ("kd", "--"), ("ce", ":")):
        points = [(step["step"], step[column]) for step in steps if step.get(column) is not None and "step" in step]
        if points:
            axis.plot(*zip(*points), style, label=column)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    return _png(figure)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_lengths(dataset_dir: str | Path, limit: int = 200_000) -> tuple[list[int], list[int]]:
    """Characters of the prompt and the response of the rows in `dataset_dir/data`, shard by
    shard; above `limit` rows an even stride of them (memory stays bounded)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from distillflow.storage.parquet import list_shards

    shards = list_shards(Path(dataset_dir) / "data")
    total = sum(pq.read_metadata(path).num_rows for path in shards)
    stride = max(1, -(-total // limit))
    prompts: list[int] = []
    responses: list[int] = []
    for path in shards:
        table = pq.read_table(path, columns=["prompt", "response"])
        prompts += pc.utf8_length(table["prompt"]).to_pylist()[::stride]
        responses += pc.utf8_length(table["response"]).to_pylist()[::stride]
    return prompts, responses


def build_summary_markdown(manifest: Manifest, lengths: tuple[list[int], list[int]] | None) -> str:
    """The build at a glance: counts per stage, reject reasons, strategies, teacher usage
    and cost, and the length histograms of the accepted rows (`lengths`: prompt and response
    characters, e.g. from `dataset_lengths`)."""
    parts = [
        f"# {manifest.name}: {manifest.accepted} accepted, {manifest.rejected} rejected",
        f"Written to `{manifest.output_dir}` in {manifest.elapsed_s:.1f} s.",
        "## Rows per stage",
        _table(["stage", "rows"], [[stage, value] for stage, value in manifest.counts.items()]),
    ]
    reasons = manifest.reject_reasons
    parts += ["## Rejects per reason"]
    parts += [_table(["reason", "rows"], [[f"`{reason}`", value] for reason, value in reasons.items()]) if reasons else "none"]
    per_strategy = manifest.accepted_per_strategy
    parts += ["## Accepted rows per strategy", _table(["strategy", "rows"], [[name, value] for name, value in per_strategy.items()])]
    usage = manifest.teacher_usage
    cost = usage.get("estimated_cost_usd")
    parts += [
        "## Teacher usage",
        _table(
            ["requests sent", "answered from the ledger", "retries", "prompt tokens", "completion tokens", "estimated cost"],
            [[
                usage.get("requests_sent", 0),
                usage.get("ledger_hits", 0),
                usage.get("retries", 0),
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", 0),
                f"${cost:.4f}" if cost is not None else "no prices in the config",
            ]],
        ),
    ]
    if lengths and lengths[0]:
        png = length_histograms_png(*lengths)
        parts += ["## Lengths of the accepted rows", f"![length histograms]({png_data_uri(png)})"]
    return "\n\n".join(parts) + "\n"


def loss_curve_markdown(title: str, steps: list[dict[str, Any]]) -> str:
    if not steps:
        return f"# {title}\n\nno steps were logged (metrics.jsonl is empty)\n"
    first, last = steps[0], steps[-1]
    return (
        f"# {title}\n\nloss {first.get('loss', float('nan')):.4f} at step {first.get('step')} → "
        f"{last.get('loss', float('nan')):.4f} at step {last.get('step')} ({len(steps)} logged steps)\n\n"
        f"![loss curve]({png_data_uri(loss_curve_png(steps))})\n"
    )

"""The markdown artifacts a person reads in the Prefect UI: counts, usage, cost and charts."""

from __future__ import annotations

import base64
import io
import re

from distillflow.storage.manifest import Manifest
from distillflow.tasks.artifact_charts import build_summary_markdown, loss_curve_markdown


def embedded_pngs(markdown: str) -> list[tuple[int, int]]:
    """(width, height) of every image embedded as a PNG data: URI."""
    import matplotlib.image

    sizes = []
    for payload in re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown):
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(payload)), format="png")
        sizes.append((image.shape[1], image.shape[0]))
    return sizes


MANIFEST = {
    "name": "docs",
    "config": {"output_dir": "data/docs"},
    "elapsed_s": 12.5,
    "counts": {"seeds": 10, "prompts_generated": 14, "accepted": 11, "rejected": 3},
    "reject_reasons": {"teacher_error:400": 1, "truncated": 2},
    "accepted_per_strategy": {"seed": 9, "adversarial": 2},
    "teacher_usage": {"requests_sent": 13, "ledger_hits": 1, "retries": 2, "prompt_tokens": 1500, "completion_tokens": 4200, "estimated_cost_usd": 0.0126},
}


def test_the_build_summary_has_counts_usage_cost_and_length_histograms():
    rows = [{"prompt": "p" * (10 + i), "response": "r" * (40 + 7 * i)} for i in range(11)]
    markdown = build_summary_markdown(Manifest.of(MANIFEST), ([len(row["prompt"]) for row in rows], [len(row["response"]) for row in rows]))
    assert markdown.startswith("# docs: 11 accepted, 3 rejected")
    assert "| accepted | 11 |" in markdown and "| prompts_generated | 14 |" in markdown
    assert "| `truncated` | 2 |" in markdown and "| `teacher_error:400` | 1 |" in markdown
    assert "| adversarial | 2 |" in markdown
    assert "| 13 | 1 | 2 | 1500 | 4200 | $0.0126 |" in markdown
    ((width, height),) = embedded_pngs(markdown)
    assert width > 300 and height > 100


def test_without_prices_the_summary_says_so_and_an_empty_build_has_no_chart():
    manifest = {**MANIFEST, "teacher_usage": {"requests_sent": 0}, "reject_reasons": {}}
    markdown = build_summary_markdown(Manifest.of(manifest), None)
    assert "no prices in the config" in markdown
    assert "## Rejects per reason\n\nnone" in markdown
    assert embedded_pngs(markdown) == []


def test_the_loss_curve_is_a_chart():
    steps = [{"step": s, "loss": 3.0 / s, "kd": 2.0 / s, "ce": 1.0 / s} for s in range(1, 21)]
    markdown = loss_curve_markdown("Loss curve", steps)
    assert "loss 3.0000 at step 1 → 0.1500 at step 20 (20 logged steps)" in markdown
    assert len(embedded_pngs(markdown)) == 1
    assert "no steps were logged" in loss_curve_markdown("Loss curve", [])

"""`distill capture-logits CONFIG`: add teacher top-k logprobs to a dataset (for kd_topk, kd_greybox).

The flow only wires: plan (which shards, mark the output incomplete) → one task per shard
(skipped when already captured with the same settings) → manifest, written last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from distillflow.config import load_config
from distillflow.storage.lock import output_lock
from distillflow.tasks.capture.logits import (
    CaptureSettings,
    capture_shard_task,
    check_capture_input,
    finish_capture_task,
    plan_capture_task,
    resolve_capture_settings,
)


@flow(name="capture-logits")
def capture_logits(settings: CaptureSettings) -> dict[str, Any]:
    with output_lock(settings.output_dir, "a logit capture"):  # OutputInUse: one paragraph, like its other errors
        shards = plan_capture_task(settings)
        results = [capture_shard_task(path, settings) for path in shards]
        return finish_capture_task(settings, results)


def capture_logits_command(config_path: str | Path) -> dict[str, Any]:
    """Validate the config up front, then run the flow; returns the manifest's capture record."""
    from distillflow.tasks.preflight import preflight_capture

    config = load_config(config_path, check_files=False)
    settings = resolve_capture_settings(config)
    check_capture_input(settings)  # a bad input directory fails before any flow starts
    preflight_capture(config, str(config_path))  # models, template, vocabulary, context
    summary = capture_logits(settings)
    print(
        f"captured {'top-' if settings.method == 'topk' else 'sampled '}{summary['k']} logprobs of "
        f"{summary['positions']} tokens in "
        f"{summary['rows']} rows → {settings.output_dir} "
        f"({summary['stored_bytes_per_token']} bytes/token stored, "
        f"{summary['shards_skipped']} shard(s) already done)"
    )
    return summary

"""The configuration reference in docs/ is generated from the config models and cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from distillflow.config_reference import REFERENCE_PATH, render_reference, undocumented_fields

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_matches_the_models():
    committed = REFERENCE_PATH.read_text(encoding="utf-8")
    assert committed == render_reference(), (
        "docs/configuration.md is out of date with the config models; run `distill config --docs --write`"
    )


def test_every_key_is_described():
    assert undocumented_fields() == [], "config fields without a description (add Field(description=...))"


def test_reference_lists_nested_keys_with_defaults_and_types():
    text = render_reference()
    assert "## `teacher.generation`" in text
    assert "| `max_tokens` | int | `512` |" in text
    assert "## `training`" in text and "| `objective` |" in text
    # Default paths shipped with the package read as in the source tree, the same on every machine.
    assert str(ROOT) not in text and '`"configs/deepspeed/zero2.json"`' in text
    # Literal types are spelled out, so a reader sees every accepted value.
    assert '"openai" \\| "local"' in text


def _distill(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_config_check_names_the_bad_key(tmp_path):
    good = _distill("config", str(ROOT / "configs" / "demo.yaml"), cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8").replace("teacher:", "teacher:\n  max_concurency: 4", 1)
    )
    result = _distill("config", str(bad), cwd=ROOT)
    assert result.returncode == 1
    assert "teacher.max_concurency: unknown key" in result.stderr

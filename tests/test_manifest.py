"""The typed records. The manifest: readers get fields, a foreign or damaged manifest.json is one error that
names the file and the field, and what a reader does not know is written back unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distillflow.storage.manifest import Manifest, ManifestError, load_manifest, mined_manifest
from tests.test_build import ROOT

BUILD = {
    "format_version": 1,
    "name": "docs",
    "config": {"output_dir": "data/docs", "teacher": {"backend": "openai"}},
    "counts": {"prompts_generated": 14, "accepted": 11, "rejected": 3},
    "accepted_per_strategy": {"seed": 9, "adversarial": 2},
    "shards": {"data": [{"path": "data/part-00000.parquet", "rows": 11, "bytes": 900, "sha256": "ab" * 32}]},
    "invariant": {"entered": 14, "accepted_plus_rejected": 14, "holds": True},  # no reader needs it
}


def test_fields_and_extras_round_trip():
    manifest = Manifest.of(BUILD)
    assert (manifest.name, manifest.accepted, manifest.rejected, manifest.output_dir) == ("docs", 11, 3, "data/docs")
    assert manifest.shard_digests() == {"data/part-00000.parquet": "ab" * 32}
    assert manifest.capture is None and manifest.stopped_by is None
    assert manifest.to_dict()["invariant"] == BUILD["invariant"]  # kept, though not a field


def test_a_dataset_written_by_other_tools_counts_its_shards():
    assert Manifest.of({"name": "bare", "shards": BUILD["shards"]}).accepted == 11


def test_mining_inherits_the_parent_and_adds_its_rows(tmp_path):
    mined = mined_manifest(Manifest.of(BUILD | {"capture": {"k": 8}}), tmp_path, 11, {"mined:math": 2}, {"kept": 2})
    assert mined["name"] == "docs-mined" and mined["counts"]["accepted"] == 13 and mined["counts"]["mined"] == 2
    assert mined["accepted_per_strategy"] == {"seed": 9, "adversarial": 2, "mined:math": 2}
    assert "shards" not in mined and "capture" not in mined and mined["invariant"] == BUILD["invariant"]


@pytest.mark.parametrize(
    ("damage", "field"),
    [({"counts": "many"}, "counts"), ({"name": None}, "name"), ({"counts": {"accepted": "eleven"}}, "counts.accepted")],
)
def test_a_damaged_manifest_names_the_file_and_the_field(tmp_path, damage, field):
    (tmp_path / "manifest.json").write_text(json.dumps(BUILD | damage))
    with pytest.raises(ManifestError, match=rf"{tmp_path}/manifest.json is not a manifest .*\b{field}\b"):
        load_manifest(tmp_path)


def test_distill_inspect_of_a_foreign_manifest_is_one_paragraph(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps(["not", "an", "object"]))
    result = subprocess.run([sys.executable, "-m", "distillflow.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert f"{tmp_path}/manifest.json holds a JSON list, not an object" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_answered_row_type_is_the_data_schema():
    """AnsweredRow (what the build makes, the filters pass and the writers take) has exactly
    the columns of data/part-*.parquet."""
    from distillflow.storage.parquet import AnsweredRow, accepted_schema

    assert list(AnsweredRow.__annotations__) == accepted_schema(with_top_logprobs=True).names
    assert AnsweredRow.__optional_keys__ == {"top_logprobs"}

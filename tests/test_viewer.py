"""The dataset viewer's data (`storage.viewer`): which rows are embedded, links, the map, the
answer tokens, and the page being self-contained. The page in a browser: test_viewer_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.storage.inspect import load_view
from distillflow.storage.topk import encode_topk
from distillflow.storage.viewer import (
    TOKEN_ROWS,
    hashed_ngram_vectors,
    json_for_script,
    pca_2d,
    render_viewer,
    sample_indices,
    tokens_from_blob,
    tokens_from_top_logprobs,
    viewer_payload,
    write_viewer,
)
from tests.test_inspect import XSS, dataset  # noqa: F401 (fixture)
from tests.viewer_data import TOP_K, write_synthetic_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """300 rows: 285 accepted with top_logprobs, 15 rejects (8 near-duplicates)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "ds", 300)


def page_data(page: str) -> dict:
    return json.loads(page.split('<script type="application/json" id="viewer-data">', 1)[1].split("</script>", 1)[0])


def test_sample_indices_keep_everything_up_to_the_cap_then_a_stable_sample():
    assert sample_indices(10, 20).tolist() == list(range(10))
    picked = sample_indices(1000, 100)
    assert len(picked) == len(set(picked.tolist())) == 100 and (np.diff(picked) > 0).all()
    assert picked.tolist() == sample_indices(1000, 100).tolist()
    assert picked.tolist() != sample_indices(1000, 100, seed=1).tolist()


def test_a_sample_is_said_and_the_file_size_is_stated(synthetic, tmp_path):
    result = runner.invoke(app, ["inspect", str(synthetic), "--viewer", str(tmp_path / "v.html"), "--viewer-rows", "100"])
    assert result.exit_code == 0, result.output
    size = (tmp_path / "v.html").stat().st_size
    assert result.output.strip() == f"viewer: {tmp_path / 'v.html'} ({size / 1e3:.1f} kB; 100 of 300 rows, a random sample (--viewer-rows))"
    data = page_data((tmp_path / "v.html").read_text(encoding="utf-8"))
    assert data["embedded"] == len(data["columns"]["id"]) == 100
    assert data["total"] == {"accepted": 285, "rejected": 15}
    assert data["note"].startswith("100 of 300 rows are shown: a random sample")
    # Accepted rows first, then rejects, each kind in its order on disk.
    kinds = data["columns"]["kind"]
    assert kinds == sorted(kinds) and 0 < sum(kinds) < 100

    written = write_viewer(synthetic, tmp_path / "all.html", max_rows=1000)
    assert (written.rows_embedded, written.rows_total) == (300, 300)
    assert written.bytes == (tmp_path / "all.html").stat().st_size
    assert written.summary().endswith(" MB; all 300 rows)")
    assert page_data((tmp_path / "all.html").read_text(encoding="utf-8"))["note"] is None


def test_duplicates_link_to_the_row_they_duplicate(synthetic):
    columns = viewer_payload(load_view(synthetic), max_rows=1000)["columns"]
    duplicates = [i for i, value in enumerate(columns["duplicate_of"]) if value]
    assert len(duplicates) == 8
    for i in duplicates:
        target = columns["duplicate_row"][i]
        assert columns["id"][target] == columns["duplicate_of"][i] and columns["kind"][target] == 0
        assert columns["prompt"][i] == columns["prompt"][target] + " ?"
    assert all(columns["duplicate_row"][i] == -1 for i in range(len(columns["id"])) if i not in duplicates)
    # A duplicate whose row is not embedded has no link.
    sampled = viewer_payload(load_view(synthetic), max_rows=20, seed=3)["columns"]
    for value, target in zip(sampled["duplicate_of"], sampled["duplicate_row"]):
        assert target == -1 or sampled["id"][target] == value


def test_page_is_self_contained_and_the_data_cannot_become_markup(dataset, monkeypatch, tmp_path):
    secret = "sk-viewer-secret-1234"
    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    table = pq.read_table(dataset / "data" / "part-00000.parquet")
    prompts = table.column("prompt").to_pylist()
    prompts[5] = f"my key is {secret}"
    pq.write_table(table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts)),
                   dataset / "data" / "part-00000.parquet")
    page = render_viewer(load_view(dataset))
    assert page.startswith("<!DOCTYPE html>") and secret not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the script: no text closes one
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<link" not in page and "@import" not in page
    data = page_data(page)
    assert XSS in data["columns"]["prompt"] and "my key is ***" in data["columns"]["prompt"]
    assert json.loads(json_for_script({"a": "</script><b>&"})) == {"a": "</script><b>&"}
    assert "<" not in json_for_script({"a": "</script>"})
    # Captured top-k whose tokenizer is not recorded: said, not guessed.
    assert data["tokens"]["missing"].startswith("tokens are not shown: the capture's tokenizer could not be loaded")


def test_hashed_ngram_vectors_put_similar_prompts_close():
    texts = ["How do I sort a list in Python?", "How do I sort a list in python ?", "Capital of France", "", "ab"]
    vectors = hashed_ngram_vectors(texts)
    assert vectors.shape == (5, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-5)
    assert not vectors[3:].any()  # no 3-gram: the zero vector
    assert vectors[0] @ vectors[1] > 0.7 > 0.2 > vectors[0] @ vectors[2]
    np.testing.assert_array_equal(vectors, hashed_ngram_vectors(texts))  # no per-process hash seed
    # No n-gram spans two texts: a text's vector does not depend on its neighbours.
    np.testing.assert_array_equal(hashed_ngram_vectors(["xyz", "abc"])[1], hashed_ngram_vectors(["abc"])[0])


def test_pca_2d_finds_the_axis_of_largest_spread():
    rng = np.random.default_rng(0)
    points = np.zeros((200, 5))
    points[:, 3] = rng.normal(0, 10, 200)  # the most spread
    points[:, 1] = rng.normal(0, 1, 200)
    projected = pca_2d(points)
    assert projected.shape == (200, 2)
    assert abs(np.corrcoef(projected[:, 0], points[:, 3])[0, 1]) > 0.99
    assert abs(np.corrcoef(projected[:, 1], points[:, 1])[0, 1]) > 0.99
    assert pca_2d(np.zeros((0, 4))).shape == (0, 2) and pca_2d(np.ones((1, 1))).shape == (1, 2)


def test_the_map_uses_stored_embeddings_when_every_row_has_one(tmp_path):
    from distillflow.storage.parquet import write_table_atomic

    rows = [{"id": f"r{i}", "prompt": f"p{i}", "response": "a", "strategy": "seed" if i < 10 else "evolve",
             "prompt_embedding": [1.0, 0.0, 0.1 * (i % 3)] if i < 10 else [0.0, 1.0, 0.1 * (i % 3)]} for i in range(20)]
    write_table_atomic(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / "part-00000.parquet")
    points = viewer_payload(load_view(tmp_path / "ds"))["map"]
    assert points["source"] == "PCA of the stored prompt embeddings (prompt_embedding)"
    x = np.array(points["x"])
    assert {min(x), max(x)} == {0, 1000} and (x[:10].max() < x[10:].min() or x[10:].max() < x[:10].min())
    text = runner.invoke(app, ["inspect", str(tmp_path / "ds")]).output
    assert "spread: mean cosine distance" in text and re.search(r"\n  evolve +10 .* 0\.00\d\n", text)


def test_tokens_from_a_blob_follow_the_answer_and_mark_what_the_topk_misses():
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    logprobs = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]))
    blob = encode_topk(ids, logprobs)
    texts, permille, alternatives = tokens_from_blob(blob, [6, 11], lambda token: f"<{token}>")
    assert texts == ["<6>", "<11>"]
    assert permille == [300, -1]  # 11 is not in the stored top-3
    assert alternatives[0] == [("<5>", 500), ("<6>", 300), ("<7>", 100)]
    assert tokens_from_blob(blob, [6], str) is None  # another tokenisation: not shown


def test_tokens_from_top_logprobs():
    cell = [{"token": " Paris", "logprob": float(np.log(0.9)), "top": [{"token": " Paris", "logprob": float(np.log(0.9))},
                                                                       {"token": " Lyon", "logprob": float(np.log(0.05))}]},
            {"token": "\n", "logprob": None, "top": None}]
    texts, permille, alternatives = tokens_from_top_logprobs(cell)
    assert texts == [" Paris", "\n"] and permille == [900, -1]
    assert alternatives == [[(" Paris", 900), (" Lyon", 50)], []]


def test_tokens_are_embedded_for_the_first_rows_with_a_shared_vocabulary(synthetic):
    payload = viewer_payload(load_view(synthetic), max_rows=1000)
    tokens = payload["tokens"]
    assert tokens["rows_with_tokens"] == min(TOKEN_ROWS, 285) == len(tokens["rows"])
    first = tokens["rows"]["0"]
    answer = payload["columns"]["response"][0]
    assert "".join(tokens["vocab"][t] for t in first["t"]) == "".join(" " + w for w in answer.split(" ")[:64])
    assert len(first["a"][0]) == 2 * TOP_K and all(0 <= p <= 1000 for p in first["p"])
    assert len(tokens["vocab"]) < sum(len(row["t"]) for row in tokens["rows"].values())  # shared, not repeated

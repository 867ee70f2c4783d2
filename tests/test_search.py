"""jobs/search.py: the HNSW index against exact search, near-duplicate groups, text and image queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import search as search_job
from mumic_batch.core import ann
from mumic_batch.pipeline.search import duplicate_groups


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_k_fed_in_batches_equals_a_full_sort():
    data, queries = unit(50), unit(4, seed=1)
    exact = ann.ExactTopK(queries, 5)
    for start in range(0, 50, 7):
        exact.add(np.arange(start, min(start + 7, 50)), data[start:start + 7])
    scores = queries @ data.T
    want = np.argsort(-scores, axis=1)[:, :5]
    np.testing.assert_array_equal(exact.keys, want)
    np.testing.assert_allclose(exact.scores, np.take_along_axis(scores, want, 1), atol=1e-6)
    assert ann.recall_at_k(exact.scores, exact.scores) == 1.0
    assert ann.recall_at_k(np.where(np.arange(5) < 4, exact.scores, np.nan), exact.scores) == pytest.approx(0.8)
    sixth = np.sort(scores, axis=1)[:, ::-1][:, 5:6]  # one result swapped for the next best: a miss
    swapped = np.concatenate([exact.scores[:, :4], sixth], axis=1)
    assert ann.recall_at_k(swapped, exact.scores) == pytest.approx(0.8)


def test_index_finds_the_exact_neighbours_and_keeps_the_vectors(tmp_path):
    data = unit(300)
    index = ann.new_index(16, ann.HnswParams(m=16, ef_construction=100, ef_search=64))
    index.add(np.arange(300), data)
    index.save(str(tmp_path / ann.INDEX_FILE))
    opened = ann.open_index(str(tmp_path / ann.INDEX_FILE), ef_search=64)
    keys, cosines = ann.search(opened, data[:20], 10)
    truth = np.sort(data[:20] @ data.T, axis=1)[:, ::-1][:, :10]
    assert ann.recall_at_k(cosines, truth) >= 0.95
    np.testing.assert_allclose(cosines, np.take_along_axis(data[:20] @ data.T, keys, 1), atol=1e-5)
    np.testing.assert_array_equal(ann.vectors(opened, np.array([7, 3])), data[[7, 3]])
    few, few_cos = ann.search(opened, data[:1], 400)  # more than there are: the rest is -1 / nan
    found = few[0] != -1
    n = int(found.sum())  # HNSW need not reach every node, so n <= 300, but the hits come first
    assert 10 <= n <= 300 and found[:n].all() and np.isnan(few_cos[0, n:]).all()
    assert len(set(few[0, :n])) == n and set(few[0, :n]) <= set(range(300))


def test_groups_join_linked_items():
    items, component = ann.groups(np.array([[5, 9], [9, 2], [7, 8]]))
    assert items.tolist() == [2, 5, 7, 8, 9]
    assert component[0] == component[1] == component[4] != component[2] == component[3]


def test_duplicate_groups_by_content_and_by_cosine():
    ids = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "uri": list("ABCDE"),
                        "content_sha256": ["s1", "s2", "s1", "s3", None]})
    near = np.array([[1.0, 3.0, 0.99], [3.0, 1.0, 0.99], [1.0, 4.0, 0.98]])  # b~d, b~e (b's best is d)
    rows = duplicate_groups(ids, near).set_index("image_id")
    assert rows.index.tolist() == ["a", "c", "b", "d", "e"]
    assert rows.loc[["a", "c"], "group_id"].tolist() == ["a", "a"] and rows.loc["a", "same_content"]
    assert pd.isna(rows.loc["a", "nearest_id"]) and rows.loc["a", "group_size"] == 2
    assert set(rows.loc[["b", "d", "e"], "group_id"]) == {"b"} and rows.loc["b", "group_size"] == 3
    assert rows.loc["b", "nearest_id"] == "d" and rows.loc["b", "nearest_cosine"] == pytest.approx(0.99)
    assert not rows.loc["b", "same_content"] and pd.isna(rows.loc["e", "nearest_id"])


def stored_embeddings(spark, tagged: Path) -> pd.DataFrame:
    rows = spark.read.format("delta").load(str(tagged / "tagged" / "predictions")).where("status = 'ok'")
    return rows.select("image_id", "content_sha256", "embedding").toPandas().sort_values("image_id")


@pytest.mark.spark
def test_build_then_query_text_and_image(spark, capsys, tmp_path, tagged_sample, tiny_artifact):
    sets = [f"tables.predictions={tagged_sample / 'tagged' / 'predictions'}", f"tables.runs={tmp_path / 'runs'}",
            f"model.artifact={tiny_artifact}", f"search.index_dir={tmp_path / 'index'}",
            f"search.duplicates={tmp_path / 'duplicates'}", "search.duplicate_cosine=0.9", "search.top_k=3"]
    args = [a for s in sets for a in ("--set", s)]
    assert search_job.main(["build", *args]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = stored_embeddings(spark, tagged_sample)
    emb = np.stack(stored["embedding"].to_numpy()).astype(np.float32)
    ids = stored["image_id"].tolist()
    assert built["rows"] == len(ids) == 11 and built["recall_at_3"] == 1.0 and built["recall_queries"] == 11

    # Near-duplicates, found exactly here: a cosine of at least 0.9, or the same bytes.
    cos = emb @ emb.T
    linked = (cos >= 0.9) | (stored["content_sha256"].to_numpy()[:, None] == stored["content_sha256"].to_numpy())
    np.fill_diagonal(linked, False)
    table = spark.read.format("delta").load(str(tmp_path / "duplicates")).toPandas().set_index("image_id")
    assert sorted(table.index) == sorted(i for i, row in zip(ids, linked) if row.any())
    by_sha = table.groupby("content_sha256")["group_id"].nunique()
    assert (by_sha == 1).all() and table["same_content"].sum() == 2  # the copy and its original
    run = spark.read.format("delta").load(str(tmp_path / "runs")).first()
    assert run["job"] == "search_index" and run["outcome"] == "succeeded" and run["processed"] == 11

    out = tmp_path / "hits.csv"
    assert search_job.main(["query", *args, "--text", "a photo with a pool", "--image-id", ids[0],
                            "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hits = pd.read_csv(out)
    assert hits.to_dict("records") == [{k: r[k] for k in hits.columns} for r in summary["results"]]
    from mumic_batch.model.predictor import Predictor

    text = Predictor.load(str(tiny_artifact), device="cpu").text_embeddings(["a photo with a pool"])[0]
    for kind, query, scores in (("text", "a photo with a pool", emb @ text),
                                ("image", ids[0], np.where(np.arange(len(ids)) == 0, -2.0, cos[0]))):
        got = hits[hits["query_kind"] == kind]
        assert got["rank"].tolist() == [1, 2, 3] and (got["query"] == query).all()
        np.testing.assert_allclose(got["score"], np.sort(scores)[::-1][:3], atol=1e-5)
        np.testing.assert_allclose(got["score"], scores[[ids.index(i) for i in got["image_id"]]], atol=1e-5)

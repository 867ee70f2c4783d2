"""docs/queries.sql runs against a tagged catalogue and returns the answers computed in Python."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs import query as query_job
from jobs import tag_images
from mumic_batch.config import SampleCfg, TablesCfg
from mumic_batch.core.ids import image_id_for
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline import query
from mumic_batch.pipeline.sample import CATALOGUE
from tests.fixtures.models import write_tiny_artifact

pytestmark = pytest.mark.spark

QUERIES = Path(__file__).resolve().parents[1] / "docs" / "queries.sql"
ZERO_SHOT = "model.zero_shot=[{name: gradient, prompt: a photo with a gradient background, threshold: 0.0}]"


@pytest.fixture(scope="module")
def tagged(spark, tmp_path_factory, tiny_artifact):
    """A catalogue of 14 images and one missing file, tagged by two model versions."""
    root = tmp_path_factory.mktemp("queries")
    sample = generate_sample(SampleCfg(out_dir=str(root / "sample"), n_images=14, seed=11))
    rows = [(r.image_id, r.uri, r.updated_at.to_pydatetime()) for r in sample.catalogue.itertuples(index=False)]
    missing = str(root / "sample" / "images" / "missing.jpg")
    rows.append((image_id_for(missing), missing, rows[0][2]))
    spark.createDataFrame(rows, CATALOGUE).write.format("delta").save(str(root / "catalogue"))
    second = write_tiny_artifact(root / "model-b", version="tiny-b", seed=1)
    tables = TablesCfg(catalogue=str(root / "catalogue"), predictions=str(root / "predictions"),
                       runs=str(root / "runs"), labels=str(root / "none"), metrics=str(root / "none"))
    for artifact in (tiny_artifact, root / "model-b"):
        sets = [f"tables.catalogue={tables.catalogue}", f"tables.predictions={tables.predictions}",
                f"tables.runs={tables.runs}", f"model.artifact={artifact}", "fetch.allowed_schemes=[file]", ZERO_SHOT]
        assert tag_images.main([a for s in sets for a in ("--set", s)]) == 0
    query.register_views(spark, tables)
    preds = [r.asDict(recursive=True) for r in spark.table("predictions").collect()]
    return {"tables": tables, "preds": preds, "old": "tiny-untrained-0", "new": second.version}


def run_named(spark, name: str, **params) -> list[dict]:
    sql = query.named_statements(QUERIES.read_text())[name]
    return query.run_sql(spark, [sql], {k: str(v) for k, v in params.items()})[0]


def ok_rows(tagged, version: str) -> list[dict]:
    return [p for p in tagged["preds"] if p["model_version"] == version and p["status"] == "ok"]


def test_every_query_in_the_file_is_checked():
    assert set(query.named_statements(QUERIES.read_text())) == {
        "label_filter", "label_counts", "version_changes", "nearest_neighbours", "last_run_failures"}


def test_label_filter(spark, tagged):
    rows = ok_rows(tagged, tagged["old"])
    label = "red"
    cut = float(np.median([p["probs"][label] for p in rows]))
    got = run_named(spark, "label_filter", model_version=tagged["old"], label=label, min_prob=cut)
    want = sorted(((p["image_id"], p["probs"][label]) for p in rows if p["probs"][label] >= cut),
                  key=lambda t: (-t[1], t[0]))
    assert [(r["image_id"], pytest.approx(r["prob"])) for r in got] == want
    assert 0 < len(got) < len(rows)


def test_label_counts_include_zero_shot(spark, tagged):
    got = run_named(spark, "label_counts", model_version=tagged["new"])
    want = Counter()
    for p in ok_rows(tagged, tagged["new"]):
        want.update((label, False) for label in p["labels"])
        want.update((label, True) for label in p["zero_shot_labels"])
    assert {(r["label"], r["zero_shot"]): r["images"] for r in got} == dict(want)
    assert any(r["zero_shot"] for r in got)


def test_version_changes(spark, tagged):
    got = run_named(spark, "version_changes", old_version=tagged["old"], new_version=tagged["new"])
    old = {p["image_id"]: set(p["labels"]) for p in ok_rows(tagged, tagged["old"])}
    new = {p["image_id"]: set(p["labels"]) for p in ok_rows(tagged, tagged["new"])}
    want = {i: (sorted(new[i] - old[i]), sorted(old[i] - new[i])) for i in old if old[i] != new[i]}
    assert {r["image_id"]: (r["gained"], r["lost"]) for r in got} == want
    assert want, "two differently seeded models should disagree on some labels"


def test_nearest_neighbours(spark, tagged):
    rows = ok_rows(tagged, tagged["old"])
    anchor = rows[0]
    got = run_named(spark, "nearest_neighbours", image_id=anchor["image_id"], model_version=tagged["old"])
    emb = {p["image_id"]: np.asarray(p["embedding"], dtype=np.float64) for p in rows}
    scores = {i: float(e @ emb[anchor["image_id"]]) for i, e in emb.items() if i != anchor["image_id"]}
    want = sorted(scores, key=lambda i: (-scores[i], i))[:5]
    assert [r["image_id"] for r in got] == want
    assert [r["cosine"] for r in got] == pytest.approx([scores[i] for i in want], abs=1e-5)


def test_last_run_failures(spark, tagged):
    got = run_named(spark, "last_run_failures")
    assert [(r["status"], r["images"]) for r in got] == [("not_found", 1)]
    assert "missing.jpg" in got[0]["example_error"]


def test_query_job_runs_the_file(spark, capsys, tagged):
    t = tagged["tables"]
    code = query_job.main([
        "--set", f"tables.predictions={t.predictions}", "--set", f"tables.runs={t.runs}",
        "--set", f"tables.catalogue={t.catalogue}", "--file", str(QUERIES),
        "--param", f"model_version={tagged['old']}", "--param", "label=red", "--param", "min_prob=0.5",
        "--param", f"old_version={tagged['old']}", "--param", f"new_version={tagged['new']}",
        "--param", f"image_id={ok_rows(tagged, tagged['old'])[0]['image_id']}",
    ])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert len(summary["results"]) == 5 and "label_probs" in summary["views"]

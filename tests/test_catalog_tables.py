"""Outputs named as catalog tables: the tagging job creates the database, the Delta tables with the
predictions properties and the persistent label_probs view; jobs.query reads them through Spark."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jobs import query as query_job
from jobs import tag_images
from mumic_batch.config import SparkCfg, TablesCfg
from mumic_batch.spark.session import session_settings
from mumic_batch.tables.catalog import local_path, names_catalog_tables
from mumic_batch.tables.schemas import PREDICTIONS_PROPERTIES

pytestmark = pytest.mark.spark

DB = "mumic_catalog_test"


def job_args(tagged_tables, artifact, metastore: str) -> list[str]:
    sets = [f"tables.catalogue={tagged_tables['tables'].catalogue}", f"tables.predictions={DB}.predictions",
            f"tables.runs={DB}.runs", f"model.artifact={artifact}", "fetch.allowed_schemes=[file]",
            f"spark.metastore={metastore}"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def catalog_tagged(spark, tagged_tables, tiny_artifact, tmp_path_factory):
    # The test session's in-memory catalog stands in for the metastore that spark.metastore would open.
    metastore = str(tmp_path_factory.mktemp("catalog") / "metastore_db")
    assert tag_images.main(job_args(tagged_tables, tiny_artifact, metastore)) == 0
    return spark


def test_the_job_creates_delta_tables_with_the_properties(catalog_tagged):
    spark = catalog_tagged
    assert spark.catalog.tableExists(f"{DB}.predictions") and spark.catalog.tableExists(f"{DB}.runs")
    props = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {DB}.predictions").collect()}
    assert {k: props.get(k) for k in PREDICTIONS_PROPERTIES} == PREDICTIONS_PROPERTIES
    detail = spark.sql(f"DESCRIBE DETAIL {DB}.predictions").first()
    assert detail["format"] == "delta" and detail["partitionColumns"] == ["model_version"]
    assert spark.table(f"{DB}.predictions").count() == 15
    assert spark.table(f"{DB}.runs").where("job = 'tag_images'").count() == 1


def test_label_probs_is_a_persistent_view(catalog_tagged):
    spark = catalog_tagged
    view = spark.catalog.getTable(f"{DB}.label_probs")
    assert view.tableType == "VIEW" and not view.isTemporary
    ok = spark.table(f"{DB}.predictions").where("status = 'ok'").collect()
    assert spark.table(f"{DB}.label_probs").count() == sum(len(r["probs"]) + len(r["zero_shot_probs"]) for r in ok)


def test_query_reads_catalog_tables_through_spark(catalog_tagged, capsys):
    code = query_job.main(["--set", f"tables.predictions={DB}.predictions", "--set", f"tables.runs={DB}.runs",
                           "--sql", "SELECT count(*) AS n FROM label_probs WHERE assigned"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["queries"][0]["engine"] == "spark"
    assert {"predictions", "runs", "label_probs"} <= set(summary["views"]["spark"])


def test_catalog_names_need_a_catalog_that_keeps_them(catalog_tagged, tagged_tables, tiny_artifact, capsys):
    code = tag_images.main(job_args(tagged_tables, tiny_artifact, ""))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and "set spark.metastore" in summary["error"]


def test_local_path_of_a_catalog_location():
    assert local_path("file:/data/wh/mumic.db/predictions") == "/data/wh/mumic.db/predictions"
    assert local_path("file:///data/wh/t") == "/data/wh/t"
    assert local_path("s3a://bucket/wh/t") == "s3a://bucket/wh/t"


def test_local_metastore_settings_apply_to_local_runs_only(tmp_path):
    cfg = SparkCfg(metastore=str(tmp_path / "metastore_db"), warehouse=str(tmp_path / "wh"))
    local = session_settings(cfg, submitted=False)
    assert local["spark.sql.catalogImplementation"] == "hive"
    assert local["spark.hadoop.javax.jdo.option.ConnectionURL"] == (
        f"jdbc:derby:;databaseName={tmp_path / 'metastore_db'};create=true")
    assert local["spark.sql.warehouse.dir"] == str(tmp_path / "wh")
    submitted = session_settings(cfg, submitted=True)
    assert not {"spark.sql.catalogImplementation", "spark.sql.warehouse.dir"} & set(submitted)
    assert "spark.sql.catalogImplementation" not in session_settings(SparkCfg(), submitted=False)


def test_a_job_on_paths_only_keeps_the_in_memory_catalog(tmp_path):
    cfg = SparkCfg(metastore=str(tmp_path / "metastore_db"), driver_java_options="-XX:TieredStopAtLevel=1")
    paths_only = session_settings(cfg, submitted=False, catalog=False)
    assert not {"spark.sql.catalogImplementation", "spark.hadoop.javax.jdo.option.ConnectionURL"} & set(paths_only)
    assert paths_only["spark.driver.extraJavaOptions"] == "-XX:TieredStopAtLevel=1"
    with_catalog = session_settings(cfg, submitted=False, catalog=True)
    assert with_catalog["spark.driver.extraJavaOptions"] == (
        f"-XX:TieredStopAtLevel=1 -Dderby.stream.error.file={tmp_path / 'derby.log'}")
    assert "spark.driver.extraJavaOptions" not in session_settings(cfg, submitted=True)


def test_which_tables_need_the_catalog(tmp_path):
    paths = TablesCfg(catalogue=str(tmp_path / "catalogue"), labels="data/sample/labels",
                      predictions="out/predictions", runs="s3a://bucket/runs", metrics="out/metrics")
    assert not names_catalog_tables(paths)
    assert names_catalog_tables(dataclasses.replace(paths, predictions=f"{DB}.predictions"))
    assert names_catalog_tables(dataclasses.replace(paths, catalogue="mumic.catalogue"))
    assert names_catalog_tables(dataclasses.replace(paths, catalogue="catalogue"))  # a bare name: a table
    assert names_catalog_tables(dataclasses.replace(paths, labels=str(tmp_path), labels_format="table"))

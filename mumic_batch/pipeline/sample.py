"""Write the seeded sample catalogue: JPEG files plus catalogue and labels tables."""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql.types import ArrayType, StringType, StructField, StructType, TimestampType

from mumic_batch.config import SampleCfg
from mumic_batch.core.sample import generate_sample
from mumic_batch.tables.io import write_table

log = logging.getLogger(__name__)

JOB = "make_sample"

CATALOGUE = StructType([
    StructField("image_id", StringType(), False),
    StructField("uri", StringType(), False),
    StructField("updated_at", TimestampType(), True),
])

LABELS = StructType([
    StructField("image_id", StringType(), False),
    StructField("uri", StringType(), False),
    StructField("labels", ArrayType(StringType()), False),
    StructField("clean_labels", ArrayType(StringType()), False),
    StructField("split", StringType(), False),
    StructField("caption", StringType(), False),
])


def table_paths(cfg: SampleCfg) -> dict[str, str]:
    out = Path(cfg.out_dir)
    return {"catalogue": str(out / "catalogue"), "labels": str(out / "labels"), "images": str(out / "images")}


def run(spark: SparkSession, cfg: SampleCfg) -> dict:
    """Generate the images and write both tables in cfg.table_format; return their paths."""
    sample = generate_sample(cfg)
    paths = table_paths(cfg)
    catalogue = sample.catalogue[[f.name for f in CATALOGUE.fields]]
    labels = sample.labels[[f.name for f in LABELS.fields]].copy()
    for col in ("labels", "clean_labels"):
        labels[col] = labels[col].map(list)
    write_table(spark.createDataFrame(catalogue, CATALOGUE), paths["catalogue"], cfg.table_format)
    write_table(spark.createDataFrame(labels, LABELS), paths["labels"], cfg.table_format)
    log.info("sample catalogue: %d images in %s, tables in %s format", len(catalogue), paths["images"],
             cfg.table_format)
    return {"job": JOB, "n_images": len(catalogue), "format": cfg.table_format, **paths}

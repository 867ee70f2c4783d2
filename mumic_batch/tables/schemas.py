"""Schemas of the tables this project writes. docs/tables.md documents every column."""

from __future__ import annotations

from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from mumic_batch.inference.outputs import OUTPUT_SCHEMA

# What the tagging UDF returns for each input row (before run-level columns are added): the
# runner's Arrow schema, the one definition of these columns.
UDF_OUTPUT = from_arrow_schema(OUTPUT_SCHEMA)

TIMING_COLUMNS = ("fetch_ms", "decode_ms", "infer_ms")

PREDICTIONS = StructType(
    [f for f in UDF_OUTPUT.fields if f.name not in TIMING_COLUMNS]
    + [
        StructField("model_name", StringType(), False),
        StructField("model_version", StringType(), False),
        StructField("model_sha256", StringType(), False),
        StructField("attempts", IntegerType(), False),
        StructField("run_id", StringType(), False),
        StructField("tagged_at", TimestampType(), False),
    ]
)

# What jobs/add_labels.py computes per predictions row from its stored embedding (staged, then
# MERGEd): the new classes' probability map and labels, typed as the predictions columns they join.
ZERO_SHOT_SCORES = StructType(
    [StructField("image_id", StringType(), False), StructField("run_id", StringType(), False)]
    + [f for f in UDF_OUTPUT.fields if f.name in ("zero_shot_probs", "zero_shot_labels")]
)

PREDICTION_KEYS = ("image_id", "model_version")
PREDICTIONS_PARTITION = "model_version"
# docs/tables.md says why: downstream jobs read tonight's changes from the change feed, file
# statistics cover the columns queries filter on instead of the first 32 (maps and arrays get none),
# and deletion vectors let a MERGE that updates a few rows mark them deleted instead of rewriting
# every file that holds one of them.
PREDICTIONS_PROPERTIES = {
    "delta.enableChangeDataFeed": "true",
    "delta.enableDeletionVectors": "true",
    "delta.dataSkippingStatsColumns": "image_id,status,run_id,tagged_at,content_sha256",
}

# The retry table (`<predictions>__retry`): the predictions that failed with a transient status, so
# that a nightly run finds its retry candidates without scanning the predictions partition. It may
# hold rows that have since succeeded (selection checks them against predictions), never fewer.
RETRY = StructType([
    StructField("image_id", StringType(), False),
    StructField("model_version", StringType(), False),
    StructField("status", StringType(), False),
    StructField("attempts", IntegerType(), False),
    StructField("tagged_at", TimestampType(), False),
])

RUNS = StructType([
    StructField("run_id", StringType(), False),
    StructField("job", StringType(), False),
    StructField("model_name", StringType(), True),
    StructField("model_version", StringType(), True),
    StructField("config", StringType(), False),
    StructField("started_at", TimestampType(), False),
    StructField("ended_at", TimestampType(), False),
    StructField("outcome", StringType(), False),
    StructField("message", StringType(), True),
    StructField("source", StringType(), True),
    StructField("source_version", LongType(), True),
    StructField("selection", StringType(), True),
    StructField("input_rows", LongType(), True),
    StructField("processed", LongType(), True),
    StructField("status_counts", MapType(StringType(), LongType()), True),
    StructField("images_per_s", DoubleType(), True),
    StructField("stage_seconds", MapType(StringType(), DoubleType()), True),
    StructField("chunks", LongType(), True),
    StructField("chunks_merged", LongType(), True),
    StructField("selected", LongType(), True),
])

# The lease table beside predictions (tables/lease.py): the run tagging each model version now.
LEASES = StructType([
    StructField("model_version", StringType(), False),
    StructField("run_id", StringType(), False),
    StructField("host", StringType(), True),
    StructField("acquired_at", TimestampType(), False),
    StructField("renewed_at", TimestampType(), False),
    StructField("expires_at", TimestampType(), False),
])

# The near-duplicate groups table (jobs/search.py build; docs/tables.md): one row per image that has a
# near-duplicate in its model version, replaced per version by every build.
DUPLICATES = StructType([
    StructField("model_version", StringType(), False),
    StructField("group_id", StringType(), False),
    StructField("group_size", IntegerType(), False),
    StructField("image_id", StringType(), False),
    StructField("uri", StringType(), True),
    StructField("content_sha256", StringType(), True),
    StructField("same_content", BooleanType(), False),
    StructField("nearest_id", StringType(), True),
    StructField("nearest_cosine", FloatType(), True),
    StructField("run_id", StringType(), False),
    StructField("found_at", TimestampType(), False),
])

# The metrics table (docs/tables.md): one row per (model version, dataset, split, class or overall, metric, run).
METRICS = StructType([
    StructField("model_name", StringType(), False),
    StructField("model_version", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("split", StringType(), False),
    StructField("class", StringType(), True),
    StructField("zero_shot", BooleanType(), True),
    StructField("metric", StringType(), False),
    StructField("value", DoubleType(), True),
    StructField("run_id", StringType(), False),
    StructField("evaluated_at", TimestampType(), False),
])

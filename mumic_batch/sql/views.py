"""The views every engine offers (catalogue, labels, predictions, label_probs, runs, metrics) and how a
table reference is read: a path, or a catalog name (`db.table`)."""

from __future__ import annotations

import re

from mumic_batch.config import TablesCfg

# `db.table` or `catalog.db.table`, each part an identifier or `quoted`; anything with a slash is a path.
_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|`[^`/]+`)"
_CATALOG_NAME = re.compile(rf"^{_PART}(?:\.{_PART}){{1,2}}$")


def is_catalog_name(ref: str) -> bool:
    """True for a catalog table name (`db.table`, `catalog.db.table`); False for a path or URI."""
    return "/" not in ref and bool(_CATALOG_NAME.match(ref))


def table_refs(tables: TablesCfg) -> dict[str, tuple[str, str]]:
    """View name -> (table reference, format: auto, delta, parquet or table) for every table."""
    def output(ref: str) -> tuple[str, str]:
        return ref, "table" if is_catalog_name(ref) else "delta"

    return {
        "catalogue": (tables.catalogue, tables.catalogue_format),
        "labels": (tables.labels, tables.labels_format),
        "predictions": output(tables.predictions),
        "runs": output(tables.runs),
        "metrics": output(tables.metrics),
    }


# The long (image_id, model_version, label, prob) view analysts query instead of the probs maps: one row
# per ok image, model version and class, trained classes (probs) and zero-shot classes (zero_shot_probs).
# Spark SQL; {predictions} is the predictions view or catalog table.
LABEL_PROBS_SPARK = """
SELECT image_id, uri, model_name, model_version, label, prob, false AS zero_shot,
       array_contains(labels, label) AS assigned, run_id, tagged_at
FROM {predictions} LATERAL VIEW explode(probs) p AS label, prob
WHERE status = 'ok'
UNION ALL
SELECT image_id, uri, model_name, model_version, label, prob, true AS zero_shot,
       array_contains(zero_shot_labels, label) AS assigned, run_id, tagged_at
FROM {predictions} LATERAL VIEW explode(zero_shot_probs) p AS label, prob
WHERE status = 'ok'
"""

# The same view in DuckDB SQL (docs/sql.md shows it): unnest(map_entries(...)) in place of LATERAL VIEW explode.
LABEL_PROBS_DUCKDB = """
SELECT image_id, uri, model_name, model_version, entry.key AS label, entry.value AS prob, false AS zero_shot,
       list_contains(labels, entry.key) AS assigned, run_id, tagged_at
FROM (SELECT *, unnest(map_entries(probs)) AS entry FROM {predictions} WHERE status = 'ok')
UNION ALL
SELECT image_id, uri, model_name, model_version, entry.key AS label, entry.value AS prob, true AS zero_shot,
       list_contains(zero_shot_labels, entry.key) AS assigned, run_id, tagged_at
FROM (SELECT *, unnest(map_entries(zero_shot_probs)) AS entry FROM {predictions} WHERE status = 'ok')
"""

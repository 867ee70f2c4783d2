"""SQL over the project's tables: each table is registered as a view under a fixed name."""

from __future__ import annotations

import logging
import re

from pyspark.sql import SparkSession

from mumic_batch.config import TablesCfg
from mumic_batch.tables.io import read_table

log = logging.getLogger(__name__)

JOB = "query"

# The long (image_id, model_version, label, prob) view analysts query instead of the probs maps.
LABEL_PROBS_SQL = """
SELECT image_id, uri, model_name, model_version, label, prob, false AS zero_shot,
       array_contains(labels, label) AS assigned, run_id, tagged_at
FROM predictions LATERAL VIEW explode(probs) p AS label, prob
WHERE status = 'ok'
UNION ALL
SELECT image_id, uri, model_name, model_version, label, prob, true AS zero_shot,
       array_contains(zero_shot_labels, label) AS assigned, run_id, tagged_at
FROM predictions LATERAL VIEW explode(zero_shot_probs) p AS label, prob
WHERE status = 'ok'
"""


def register_views(spark: SparkSession, tables: TablesCfg) -> list[str]:
    """Register every table that exists as a temp view; return the view names."""
    refs = {
        "catalogue": (tables.catalogue, tables.catalogue_format),
        "labels": (tables.labels, tables.labels_format),
        "predictions": (tables.predictions, "delta"),
        "runs": (tables.runs, "delta"),
        "metrics": (tables.metrics, "delta"),
    }
    views = []
    for name, (ref, fmt) in refs.items():
        try:
            read_table(spark, ref, fmt).createOrReplaceTempView(name)
        except Exception as err:  # noqa: BLE001 - a table not written yet simply has no view
            log.info("no view %s: %s", name, str(err).splitlines()[0])
            continue
        views.append(name)
    if "predictions" in views:
        spark.sql(LABEL_PROBS_SQL).createOrReplaceTempView("label_probs")
        views.append("label_probs")
    return views


def run_sql(spark: SparkSession, statements: list[str], params: dict[str, object] | None = None) -> list[list[dict]]:
    """Run each statement (with the named parameters it uses) and return its rows as dicts."""
    results = []
    for sql in statements:
        used = {k: v for k, v in (params or {}).items() if re.search(rf":{k}\b", sql)}
        log.info("running SQL: %s %s", " ".join(sql.split()), used or "")
        results.append([row.asDict(recursive=True) for row in spark.sql(sql, args=used or None).collect()])
    return results


def named_statements(text: str) -> dict[str, str]:
    """The statements of a .sql file, keyed by their `-- name: x` line (unnamed ones by position)."""
    named: dict[str, str] = {}
    for i, chunk in enumerate(re.split(r";\s*(?:\n|$)", text)):
        name = re.search(r"^--\s*name:\s*(\w+)", chunk, re.MULTILINE)
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if body:
            named[name.group(1) if name else f"statement_{i + 1}"] = body
    return named


def parse_params(items: list[str]) -> dict[str, object]:
    """`name=value` pairs, kept as strings (Spark casts them where a number is compared)."""
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param '{item}' must look like name=value")
        params[key] = value
    return params


def format_rows(rows: list[dict], limit: int = 20) -> str:
    """A plain-text table of up to `limit` rows for humans."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows[:limit]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."

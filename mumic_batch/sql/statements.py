"""Named queries from .sql files, their :parameters, and their results (screen, CSV, Parquet, JSON).

A file holds statements ending with ';'. A `-- name: x` comment names the statement that follows; an
`-- engine: duckdb` (or `spark`) comment marks a variant written for one engine, for the few queries
that no single SQL text runs on both (docs/queries.sql: nearest_neighbours). Parameters are `:name`
(Spark SQL's named parameters; the DuckDB engine rewrites them to `$name`); values are strings.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ANY = "any"
ENGINES = ("duckdb", "spark")

# String literals and quoted identifiers, where a ':' is text, not a parameter.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`")
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class QueryError(ValueError):
    """A query cannot run as asked: unknown name, missing parameter, unknown view; the message says what exists."""


@dataclass
class Query:
    """One named query: its SQL text per engine (`any` runs on both)."""

    name: str
    variants: dict[str, str] = field(default_factory=dict)

    def sql_for(self, engine: str) -> str | None:
        """The text this engine runs: its own variant, else the shared one; None when it has neither."""
        return self.variants.get(engine, self.variants.get(ANY))

    def params(self, engine: str) -> list[str]:
        """Parameter names the engine's text uses, in order of first use."""
        return param_names(self.sql_for(engine) or "")


def parse_queries(text: str) -> dict[str, Query]:
    """The statements of a .sql file by name (unnamed ones are `statement_<n>`), in file order."""
    queries: dict[str, Query] = {}
    for i, chunk in enumerate(re.split(r";\s*(?:\n|$)", text)):
        name = re.search(r"^\s*--\s*name:\s*(\w+)", chunk, re.MULTILINE)
        engine = re.search(r"^\s*--\s*engine:\s*(\w+)", chunk, re.MULTILINE)
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if not body:
            continue
        key = name.group(1) if name else f"statement_{i + 1}"
        variant = engine.group(1).lower() if engine else ANY
        if variant not in (ANY, *ENGINES):
            raise QueryError(f"query {key}: unknown engine '{variant}' (use one of {', '.join(ENGINES)})")
        query = queries.setdefault(key, Query(key))
        if variant in query.variants:
            raise QueryError(f"query {key} is defined twice for engine {variant}")
        query.variants[variant] = body
    return queries


def select(queries: dict[str, Query], names: list[str], source: str) -> list[Query]:
    """The named queries, in the order asked; an unknown name lists the file's queries."""
    missing = [n for n in names if n not in queries]
    if missing:
        raise QueryError(f"no query named {', '.join(missing)} in {source}; its queries: {', '.join(queries)}")
    return [queries[n] for n in names] if names else list(queries.values())


def param_names(sql: str) -> list[str]:
    """`:name` parameters outside string literals and quoted identifiers (`::` casts are not parameters)."""
    names: list[str] = []
    for part in _QUOTED.split(sql):
        names += [m.group(1) for m in _PARAM.finditer(part) if m.group(1) not in names]
    return names


def to_dollar_params(sql: str) -> str:
    """`:name` -> `$name` (DuckDB's named parameters), leaving literals and identifiers alone."""
    out, last = [], 0
    for m in _QUOTED.finditer(sql):
        out += [_PARAM.sub(r"$\1", sql[last:m.start()]), m.group(0)]
        last = m.end()
    return "".join([*out, _PARAM.sub(r"$\1", sql[last:])])


def parse_params(items: list[str]) -> dict[str, str]:
    """`name=value` pairs (values stay strings: write CAST(:x AS DOUBLE) where a number is meant)."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise QueryError(f"--param '{item}' must look like name=value")
        params[key] = value
    return params


def check_params(query: Query, engine: str, params: dict[str, str]) -> dict[str, str]:
    """The parameters the query uses; a missing one is named with the --param to add."""
    needed = query.params(engine)
    missing = [n for n in needed if n not in params]
    if missing:
        raise QueryError(f"query {query.name} needs " + " ".join(f"--param {n}=..." for n in missing))
    return {n: params[n] for n in needed}


def rows(table: pa.Table) -> list[dict]:
    """The result as Python rows, map columns as dicts (Arrow gives maps as lists of pairs)."""
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    out = table.to_pylist()
    for row in out:
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
    return out


def write_result(table: pa.Table, path: str) -> None:
    """Write a result by the file's extension: .csv, .parquet, .json (one array) or .jsonl (a row per line)."""
    suffix = Path(path).suffix.lower()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table.column_names)
            writer.writerows([_csv_cell(v) for v in row.values()] for row in rows(table))
    elif suffix == ".json":
        Path(path).write_text(json.dumps(rows(table), default=_json_value) + "\n")
    elif suffix in (".jsonl", ".ndjson"):
        Path(path).write_text("".join(json.dumps(r, default=_json_value) + "\n" for r in rows(table)))
    else:
        raise QueryError(f"--out {path}: unknown extension '{suffix}' (use .csv, .parquet, .json or .jsonl)")


def _json_value(value):
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date)) else str(value)


def _csv_cell(value) -> str:
    """Nested values (arrays, maps) as JSON, timestamps as ISO 8601, null as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_value)
    return _json_value(value) if isinstance(value, (dt.datetime, dt.date)) else str(value)


def format_rows(table_rows: list[dict], limit: int = 20, width: int = 60) -> str:
    """A plain-text table of up to `limit` rows for the screen (cells cut at `width` characters)."""
    if not table_rows:
        return "(no rows)"
    cols = list(table_rows[0])
    cells = [[_cell(r[c], width) for c in cols] for r in table_rows[:limit]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if len(table_rows) > limit:
        lines.append(f"... {len(table_rows) - limit} more rows (--limit, or --out FILE for all of them)")
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."

"""The DuckDB engine: the tables as views over local Delta (`delta_scan`) and Parquet paths, in-process,
without a JVM. The delta extension comes from the `duckdb-extension-delta` wheel (no download at run
time); it applies deletion vectors, so the predictions table reads right (docs/sql.md)."""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import pyarrow as pa

from mumic_batch.config import TablesCfg
from mumic_batch.sql.runner import Unavailable
from mumic_batch.sql.statements import to_dollar_params
from mumic_batch.sql.views import LABEL_PROBS_DUCKDB, is_catalog_name, table_refs

log = logging.getLogger(__name__)


def extension_path() -> Path:
    """The delta extension file shipped by the duckdb-extension-delta wheel for the installed DuckDB."""
    try:
        import duckdb
    except ImportError as err:
        raise Unavailable("duckdb is not installed") from err
    try:
        root = importlib.resources.files("duckdb_extension_delta")
    except ModuleNotFoundError as err:
        raise Unavailable(f"duckdb-extension-delta is not installed (pip install duckdb-extension-delta=="
                          f"{duckdb.__version__})") from err
    path = Path(str(root)) / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    if not path.is_file():
        raise Unavailable(f"no delta extension for DuckDB {duckdb.__version__} in {root} "
                          f"(pip install duckdb-extension-delta=={duckdb.__version__})")
    return path


def table_source(ref: str, fmt: str) -> str | None:
    """The DuckDB table function reading `ref`; None when the table does not exist (no view)."""
    if is_catalog_name(ref) or fmt == "table":
        raise Unavailable(f"'{ref}' is a catalog table: only Spark reads the metastore")
    if "://" in ref and not ref.startswith("file://"):
        raise Unavailable(f"'{ref}' is a remote URI: the DuckDB engine reads local paths")
    path = Path(ref.removeprefix("file://")).resolve()
    quoted = str(path).replace("'", "''")
    is_delta = (path / "_delta_log").is_dir()
    if fmt == "delta" or (fmt == "auto" and is_delta):
        return f"delta_scan('{quoted}')" if is_delta else None
    if not path.exists():
        return None
    if path.is_dir():
        return f"read_parquet('{quoted}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    return f"read_parquet('{quoted}')"


def sources(tables: TablesCfg) -> dict[str, str | None]:
    """View name -> table function for every table (None: not written yet); raises Unavailable."""
    return {name: table_source(ref, fmt) for name, (ref, fmt) in table_refs(tables).items()}


class DuckEngine:
    """One in-memory DuckDB connection with a view per existing table, plus label_probs."""

    name = "duckdb"

    def __init__(self, tables: TablesCfg) -> None:
        found = sources(tables)
        extension = extension_path()
        import duckdb

        # Never reach the network for an extension: everything needed is loaded explicitly.
        self.con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False})
        self.con.execute(f"LOAD '{str(extension).replace(chr(39), chr(39) * 2)}'")
        self.con.execute("SET TimeZone = 'UTC'")  # as the Spark sessions: timestamps print in UTC
        self.views = []
        for view, source in found.items():
            if source is None:
                log.info("no view %s: table not found", view)
                continue
            self.con.execute(f"CREATE VIEW {view} AS SELECT * FROM {source}")
            self.views.append(view)
        if "predictions" in self.views:
            self.con.execute(f"CREATE VIEW label_probs AS {LABEL_PROBS_DUCKDB.format(predictions='predictions')}")
            self.views.append("label_probs")

    def run(self, sql: str, params: dict[str, str], limit: int | None) -> pa.Table:
        """The statement's rows (at most `limit`) as an Arrow table."""
        cursor = self.con.execute(to_dollar_params(sql), params or None)
        reader = cursor.to_arrow_reader()
        if limit is None:
            return reader.read_all()
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n >= limit:
                break
        return pa.Table.from_batches(batches, schema=reader.schema).slice(0, limit)

    @staticmethod
    def missing_table(err: Exception) -> bool:
        """True when DuckDB failed because the statement names a table or view that does not exist."""
        import duckdb

        return isinstance(err, duckdb.CatalogException) and "Table with name" in str(err)

    def close(self) -> None:
        self.con.close()

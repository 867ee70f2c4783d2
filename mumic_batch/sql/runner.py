"""Run named queries on DuckDB or Spark: `auto` answers on DuckDB when it can read the tables (local
Delta and Parquet paths) and the query has a text it runs, else on Spark; each engine starts at most
once, on first use, so a DuckDB-only run never starts a JVM."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from mumic_batch.sql.statements import Query, QueryError, check_params

log = logging.getLogger(__name__)

CHOICES = ("auto", "duckdb", "spark")


class Engine(Protocol):
    name: str
    views: list[str]

    def run(self, sql: str, params: dict[str, str], limit: int | None) -> pa.Table: ...

    def missing_table(self, err: Exception) -> bool: ...


class Unavailable(RuntimeError):
    """The engine cannot serve these tables; the message says why."""


@dataclass
class Result:
    name: str
    engine: str
    table: pa.Table
    seconds: float


class Engines:
    """The engines a run may use, each built by its factory on first use (factories raise Unavailable)."""

    def __init__(self, choice: str, factories: dict[str, Callable[[], Engine]]) -> None:
        if choice not in CHOICES:
            raise QueryError(f"--engine {choice}: use one of {', '.join(CHOICES)}")
        self.choice, self.factories = choice, factories
        self.started: dict[str, Engine] = {}
        self.refused: dict[str, str] = {}

    def get(self, name: str) -> Engine | None:
        """The started engine, or None (with the reason in `refused`) when it cannot serve the tables."""
        if name not in self.started and name not in self.refused:
            try:
                self.started[name] = self.factories[name]()
            except Unavailable as err:
                self.refused[name] = str(err)
                log.info("%s engine not available: %s", name, err)
        return self.started.get(name)

    def plan(self, query: Query) -> list[str]:
        """Engines to try for this query, in order."""
        if self.choice != "auto":
            return [self.choice]
        return [e for e in ("duckdb", "spark") if query.sql_for(e) is not None]


def run_queries(queries: list[Query], params: dict[str, str], engines: Engines, limit: int | None) -> list[Result]:
    """Every query's result; params are checked for all queries before the first one runs."""
    for query in queries:
        plan = engines.plan(query)
        if not plan or query.sql_for(plan[0]) is None:
            raise QueryError(f"query {query.name} has no text for engine {engines.choice} "
                             f"(it has: {', '.join(query.variants)})")
        check_params(query, plan[0], params)
    return [run_query(query, params, engines, limit) for query in queries]


def run_query(query: Query, params: dict[str, str], engines: Engines, limit: int | None) -> Result:
    """Run one query on the first engine of its plan that can; in auto mode, a statement DuckDB rejects
    (Spark SQL it does not know) runs on Spark instead."""
    plan = engines.plan(query)
    for i, name in enumerate(plan):
        engine = engines.get(name)
        if engine is None:
            if engines.choice != "auto" or i == len(plan) - 1:
                raise QueryError(f"the {name} engine cannot run query {query.name}: {engines.refused[name]}")
            continue
        sql = query.sql_for(name)
        started = time.perf_counter()
        try:
            table = engine.run(sql, check_params(query, name, params), limit)
        except Exception as err:  # noqa: BLE001 - reworded below with the views, or retried on Spark
            if engine.missing_table(err) or i == len(plan) - 1:
                raise QueryError(f"query {query.name} failed on {name}: {_first_line(err)}; views: "
                                 f"{', '.join(engine.views) or 'none (no table found)'}") from err
            log.warning("query %s: DuckDB cannot run it (%s); running it on Spark", query.name, _first_line(err))
            continue
        seconds = time.perf_counter() - started
        log.info("query %s on %s: %d rows in %.3f s", query.name, name, table.num_rows, seconds)
        return Result(query.name, name, table, seconds)
    raise QueryError(f"no engine could run query {query.name}: {engines.refused}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

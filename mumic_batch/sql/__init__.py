"""SQL for analysts over the project's tables: named queries, parameters, results, and the DuckDB engine
that answers them without a JVM. No pyspark here: pipeline/query.py is the Spark engine."""

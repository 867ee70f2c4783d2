"""Table I/O: schemas and Delta/Parquet reads and writes."""

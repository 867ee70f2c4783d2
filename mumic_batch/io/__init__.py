"""Byte I/O outside Spark: fetching image objects and model artifacts (no pyspark, no torch)."""

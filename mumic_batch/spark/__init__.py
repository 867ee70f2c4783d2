"""Spark glue: sessions and pandas UDFs (pyspark lives here and in tables/, pipeline/)."""

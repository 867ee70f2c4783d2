"""Pure core: no pyspark, no torch."""

"""mumic-batch: offline MuMIC image tagging on Spark and Delta Lake."""

__version__ = "0.1.0"

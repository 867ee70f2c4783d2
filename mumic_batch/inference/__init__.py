"""The inference runner: fetch -> decode -> preprocess -> model -> Arrow output, without Spark."""

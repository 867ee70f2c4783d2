"""The MuMIC model: torch and open_clip, never pyspark."""

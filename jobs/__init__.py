"""Thin job entry points: parse config, build the session, call one pipeline function."""

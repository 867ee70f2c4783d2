"""Errors that end a run with a specific outcome and exit code, rather than as a crash."""

from __future__ import annotations

import re


class RunStopped(Exception):
    """A run that stops on purpose: its runs row gets `outcome`, the process exits with `exit_code`.

    Exit codes of every job: 0 succeeded, 1 failed, 2 bad configuration, 3 another run of the same
    model version holds the predictions table's lease (nothing was done).
    """

    outcome = "failed"
    exit_code = 1


class ThresholdsExceeded(RunStopped):
    """The run wrote its rows, but too many failed (tag.max_error_rate) or too few are ok (tag.min_ok_rows)."""


# "pkg.module.ArtifactError: sha256 mismatch ..." in a Python traceback; "org.x.SparkException: ..." in a JVM one.
_EXCEPTION_LINE = re.compile(r"^(?:[\w$]+\.)*(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$")
MESSAGE_CHARS = 2000


def failure_message(err: BaseException) -> str:
    """The cause of a failure on one line: exception class and message, never a traceback.

    Errors raised in Spark's Python workers or in the JVM reach the driver wrapped, with tracebacks in
    their text; the cause is the innermost exception those name.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if isinstance(err, RunStopped):
        return f"{type(err).__name__}: {first}"[:MESSAGE_CHARS]
    if any("Traceback (most recent call last)" in line for line in lines):
        causes = [m for m in map(_EXCEPTION_LINE.match, lines) if m]
        if causes:
            return f"{causes[-1].group(1)}: {causes[-1].group(2)}"[:MESSAGE_CHARS]
    if first.startswith("An error occurred while calling") and len(lines) > 1:
        found = _EXCEPTION_LINE.match(lines[1].lstrip(": "))
        if found:
            return f"{found.group(1)}: {found.group(2)}"[:MESSAGE_CHARS]
    return f"{type(err).__name__}: {first}"[:MESSAGE_CHARS]

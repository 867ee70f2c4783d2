"""Whether a tagging run's row statuses are healthy enough to call the run a success."""

from __future__ import annotations

from collections.abc import Mapping

from mumic_batch.core.status import OK, status_class

TOP_STATUSES = 3  # statuses named (with an example URI each) in a failed run's message


def threshold_failures(counts: Mapping[str, int], max_error_rate: Mapping[str, float],
                       min_ok_rows: int) -> list[str]:
    """One line per limit the run broke: a status class above its share of the rows, or too few ok rows."""
    total = sum(counts.values())
    by_class: dict[str, int] = {}
    for status, n in counts.items():
        by_class[status_class(status)] = by_class.get(status_class(status), 0) + n
    broken = []
    for cls, limit in max_error_rate.items():
        n = by_class.get(cls, 0)
        if total and n / total > limit:
            broken.append(f"{n} of {total} rows ({100.0 * n / total:.1f}%) failed with a {cls} status, "
                          f"above tag.max_error_rate.{cls}={limit}")
    ok = counts.get(OK, 0)
    if ok < min_ok_rows:
        broken.append(f"{ok} rows came out ok, fewer than tag.min_ok_rows={min_ok_rows}")
    return broken


def top_failures(counts: Mapping[str, int], examples: Mapping[str, str]) -> str:
    """The most frequent failure statuses with an example URI each, e.g. `blocked_path 998 (e.g. /x.jpg)`."""
    failed = sorted(((n, s) for s, n in counts.items() if s != OK), key=lambda t: (-t[0], t[1]))
    return "; ".join(f"{s} {n} (e.g. {examples.get(s, '?')})" for n, s in failed[:TOP_STATUSES])


def check_thresholds(counts: Mapping[str, int], examples: Mapping[str, str], max_error_rate: Mapping[str, float],
                     min_ok_rows: int) -> str | None:
    """None for a healthy run, else the failure message: the broken limits, then the top statuses."""
    broken = threshold_failures(counts, max_error_rate, min_ok_rows)
    if not broken:
        return None
    top = top_failures(counts, examples)
    return "; ".join(broken) + (f". Top statuses: {top}" if top else "")

"""Pieces shared by the fetch readers: the error type, the per-object deadline, retry delays."""

from __future__ import annotations

import random
import time

from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

from mumic_batch.core.status import TIMEOUT, ImageError

# Only urllib3's Retry-After parser is used: its retry loop would sleep past fetch.deadline_s and
# has no first-retry delay, so the loop stays ours (docs/fetching.md, Retries).
_RETRY_AFTER = Retry(total=0)


class FetchError(ImageError):
    """An ImageError that also says how many attempts (requests) were made."""

    def __init__(self, status: str, message: str, attempts: int = 1) -> None:
        super().__init__(status, message)
        self.attempts = attempts


class Deadline:
    """Monotonic end time for one object, retries and redirects included."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left (may be negative)."""
        return self.end - time.monotonic()

    def cap(self, timeout: float) -> float:
        """`timeout` shortened to the time left; raises FetchError(TIMEOUT) when none is left."""
        left = self.remaining()
        if left <= 0:
            raise FetchError(TIMEOUT, f"deadline of {self.seconds:g}s exceeded")
        return min(timeout, left)


def backoff_delay(base_s: float, retry: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `retry` (1, 2, ...): base * 2**(retry-1), jittered to 50-100%."""
    # Jitter spreads the retries of many threads hitting one throttled server.
    jitter = 0.5 + 0.5 * (rng or random).random()
    return base_s * (2 ** (retry - 1)) * jitter


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent/invalid."""
    if not value:
        return None
    try:
        return float(_RETRY_AFTER.parse_retry_after(value))
    except InvalidHeader:
        return None

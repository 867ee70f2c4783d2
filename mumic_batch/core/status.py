"""Per-row status codes. Every input row ends as `ok` or exactly one of these errors."""

from __future__ import annotations

import re

OK = "ok"

# Fetching
NOT_FOUND = "not_found"
ACCESS_DENIED = "access_denied"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
BLOCKED_SCHEME = "blocked_scheme"
BLOCKED_BUCKET = "blocked_bucket"
BLOCKED_HOST = "blocked_host"
BLOCKED_DESTINATION = "blocked_destination"  # private, loopback, link-local or metadata address
BLOCKED_PATH = "blocked_path"  # local path outside the configured roots
BAD_URI = "bad_uri"
FETCH_ERROR = "fetch_error"  # connection reset, DNS failure, ... after the retries ran out
THROTTLED = "throttled"  # s3 SlowDown/503 still returned after the retries ran out
TOO_MANY_REDIRECTS = "too_many_redirects"  # http redirect chain longer than fetch.max_redirects
# http_<code> is built by http_status(code)

# Decoding
EMPTY = "empty"
DECODE_ERROR = "decode_error"
TRUNCATED = "truncated"
UNSUPPORTED_FORMAT = "unsupported_format"
DECOMPRESSION_BOMB = "decompression_bomb"

# Anything unexpected in per-row code: the row is kept, with the exception class in `error`.
INTERNAL_ERROR = "internal_error"


# Failures that may go away by themselves; later runs retry them (tag.max_attempts, tag.retry_after_s).
# Every other failure is permanent for the same input: it is redone only when the uri or
# updated_at changes, or with --full.
TRANSIENT = frozenset({TIMEOUT, FETCH_ERROR, THROTTLED, INTERNAL_ERROR})
# HTTP answers worth asking again: within the run (io/fetch_http.py) and on a later night (the status
# http_<code>). 501 and 505 say the server will never serve the request, so they are permanent.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_HTTP_PATTERN = "^http_(" + "|".join(str(code) for code in sorted(TRANSIENT_HTTP)) + ")$"


# Rows refused by this job's own fetch policy (fetch.* allow-lists, size cap): a night full of them
# usually means a wrong config or a catalogue pointing somewhere new, not bad images.
POLICY = frozenset({BLOCKED_SCHEME, BLOCKED_BUCKET, BLOCKED_HOST, BLOCKED_DESTINATION, BLOCKED_PATH, TOO_LARGE,
                    TOO_MANY_REDIRECTS})

# The classes tag.max_error_rate limits; every status other than `ok` is in exactly one.
PERMANENT_CLASS, TRANSIENT_CLASS, POLICY_CLASS = "permanent", "transient", "policy"


def status_class(status: str) -> str:
    """ok, transient (retried by later runs), policy (refused by the fetch policy) or permanent."""
    if status == OK:
        return OK
    if is_transient(status):
        return TRANSIENT_CLASS
    return POLICY_CLASS if status in POLICY else PERMANENT_CLASS


def is_transient(status: str) -> bool:
    """True when a later run should retry a row that ended with `status`."""
    return status in TRANSIENT or re.match(TRANSIENT_HTTP_PATTERN, status) is not None


def http_status(code: int) -> str:
    return f"http_{code}"


class ImageError(Exception):
    """A per-row failure with a specific status; it never fails the job."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

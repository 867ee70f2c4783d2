"""Fetch image bytes from file://, plain paths, s3:// and http(s):// under one safety policy.

`Fetcher.fetch(uri)` returns bytes or raises ImageError(status, message); docs/fetching.md lists
the statuses, which of them are retried, the config keys and the SSRF policy. One Fetcher per
Python worker, shared by its fetch threads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mumic_batch.config import FetchCfg
from mumic_batch.core.status import BLOCKED_SCHEME, INTERNAL_ERROR, ImageError
from mumic_batch.io.addresses import Resolver, parse_networks
from mumic_batch.io.fetch_base import Deadline, FetchError
from mumic_batch.io.fetch_http import HttpReader
from mumic_batch.io.fetch_local import read_local, resolve_roots
from mumic_batch.io.fetch_s3 import S3Reader
from mumic_batch.io.uris import ParsedUri, parse_uri
from mumic_batch.io.watchdog import Watchdog

log = logging.getLogger(__name__)

__all__ = ["Fetched", "FetchError", "Fetcher"]


@dataclass(frozen=True)
class Fetched:
    """Bytes of one object and how many requests it took (1 unless retried or redirected)."""

    data: bytes
    attempts: int


class Fetcher:
    """Reads objects by URI; thread-safe; the boto3 client and watchdog thread start on first use."""

    def __init__(self, cfg: FetchCfg, *, resolver: Resolver | None = None) -> None:
        """`resolver` replaces the system DNS lookup (tests, or a caching resolver)."""
        self._cfg = cfg
        self._roots = resolve_roots(cfg.local_roots)
        self._watchdog = Watchdog()
        self._http = HttpReader(cfg, parse_networks(cfg.allowed_networks), self._watchdog, resolver)
        self._s3 = S3Reader(cfg)

    def fetch(self, uri: str) -> bytes:
        """The object's bytes; raises ImageError (a FetchError carrying `attempts`)."""
        return self.fetch_detailed(uri).data

    def fetch_detailed(self, uri: str) -> Fetched:
        """Like fetch, and also reports the number of requests made."""
        start = time.monotonic()
        try:
            result = self._dispatch(uri)
        except ImageError as err:
            log.debug("fetch %r failed: %s (%.3fs)", uri, err, time.monotonic() - start)
            if isinstance(err, FetchError):
                raise
            raise FetchError(err.status, err.message, attempts=0) from err  # refused before any request
        except Exception as err:  # a bug, not a bad object: keep the row, name the exception
            log.warning("unexpected error fetching %r", uri, exc_info=True)
            raise FetchError(INTERNAL_ERROR, f"{type(err).__name__}: {err}") from err
        log.debug("fetched %r: %d bytes, %d attempt(s), %.3fs", uri, len(result.data), result.attempts,
                  time.monotonic() - start)
        return result

    def s3_client(self) -> Any:
        """The shared boto3 S3 client (created on first call)."""
        return self._s3.client()

    def close(self) -> None:
        """Close the pooled http(s) and S3 connections and stop the watchdog thread."""
        self._http.close()
        self._s3.close()
        self._watchdog.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dispatch(self, uri: str) -> Fetched:
        parsed = parse_uri(uri)
        self._check_scheme(parsed)
        deadline = Deadline(self._cfg.deadline_s)
        if parsed.scheme == "file":
            return Fetched(read_local(parsed.path, self._roots, self._cfg.max_bytes), 1)
        if parsed.scheme == "s3":
            data, attempts = self._s3.read(parsed.host, parsed.path, deadline)
            return Fetched(data, attempts)
        data, attempts = self._http.read(parsed, deadline)
        return Fetched(data, attempts)

    def _check_scheme(self, parsed: ParsedUri) -> None:
        if parsed.scheme not in self._cfg.allowed_schemes:
            raise FetchError(BLOCKED_SCHEME, f"scheme {parsed.scheme!r} is not in fetch.allowed_schemes", attempts=0)

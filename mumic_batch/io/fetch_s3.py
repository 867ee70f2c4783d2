"""s3:// reader: one boto3 client per Fetcher (thread-safe), standard retries, capped bodies."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mumic_batch.config import FetchCfg
from mumic_batch.core.status import (
    ACCESS_DENIED,
    BAD_URI,
    BLOCKED_BUCKET,
    FETCH_ERROR,
    NOT_FOUND,
    THROTTLED,
    TIMEOUT,
    TOO_LARGE,
)
from mumic_batch.io.fetch_base import Deadline, FetchError, backoff_delay

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket", "NoSuchVersion"})
_DENIED = frozenset({"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "ExpiredToken", "InvalidToken", "AccountProblem"})
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503",
                        "ServiceUnavailable", "TooManyRequests"})


class _BodyRetryable(Exception):
    """The object's body broke off mid-stream; botocore does not retry that, so we do."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class S3Reader:
    """Reads s3://bucket/key objects under FetchCfg's bucket allowlist, byte cap and deadline."""

    def __init__(self, cfg: FetchCfg) -> None:
        self._cfg = cfg
        self._lock = threading.Lock()
        self._client: Any = None
        self._local = threading.local()  # per-thread count of requests sent (retries included)

    def client(self) -> Any:
        """The shared boto3 S3 client, created on first use (botocore clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3  # lazily: workers that never see s3:// do not pay for the import
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "total_max_attempts": self._cfg.max_attempts},
            max_pool_connections=self._cfg.threads,  # one pooled connection per fetch thread
            connect_timeout=self._cfg.connect_timeout_s,
            read_timeout=self._cfg.read_timeout_s,
        )
        # A session per Fetcher: boto3's default session is shared module state and not thread-safe.
        client = boto3.session.Session().client(
            "s3", endpoint_url=self._cfg.s3_endpoint_url or None, region_name=self._cfg.s3_region or None,
            config=config,
        )
        client.meta.events.register("before-send.s3.GetObject", self._count_send)
        return client

    def _count_send(self, **_: Any) -> None:
        self._local.sends = getattr(self._local, "sends", 0) + 1

    def close(self) -> None:
        """Close the client's connection pool."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def read(self, bucket: str, key: str, deadline: Deadline) -> tuple[bytes, int]:
        """Object bytes and the number of requests sent; raises FetchError."""
        if self._cfg.allowed_buckets and bucket not in self._cfg.allowed_buckets:
            raise FetchError(BLOCKED_BUCKET, f"bucket {bucket} is not in fetch.allowed_buckets", attempts=0)
        client = self.client()
        self._local.sends = 0
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._get(client, bucket, key, deadline), max(1, self._local.sends)
            except _BodyRetryable as err:
                self._wait_before_retry(err, attempt, deadline)
            except FetchError as err:
                err.attempts = max(1, self._local.sends)
                raise

    def _wait_before_retry(self, err: _BodyRetryable, attempt: int, deadline: Deadline) -> None:
        sends = max(1, self._local.sends)
        if attempt >= self._cfg.max_attempts:
            raise FetchError(err.status, f"body read failed: {err}", sends) from err
        delay = backoff_delay(self._cfg.backoff_s, attempt)
        if delay >= deadline.remaining():
            raise FetchError(err.status, f"body read failed: {err} (no time left to retry)", sends) from err
        log.debug("s3 body read failed (%s); retrying in %.2fs", err, delay)
        time.sleep(delay)

    def _get(self, client: Any, bucket: str, key: str, deadline: Deadline) -> bytes:
        deadline.cap(self._cfg.read_timeout_s)  # no time left: TIMEOUT before sending anything
        params = {"Bucket": bucket, "Key": key}
        if self._cfg.s3_expected_bucket_owner:
            # A bucket name re-created under another account then fails closed (403).
            params["ExpectedBucketOwner"] = self._cfg.s3_expected_bucket_owner
        try:
            resp = client.get_object(**params)
        except Exception as err:  # noqa: BLE001 - botocore raises many unrelated types
            raise _classify(err) from err
        body = resp["Body"]
        try:
            return self._read_body(body, resp.get("ContentLength"), deadline)
        finally:
            body.close()

    def _read_body(self, body: Any, length: int | None, deadline: Deadline) -> bytes:
        if length is not None and length > self._cfg.max_bytes:
            raise FetchError(TOO_LARGE, f"ContentLength {length} > max_bytes {self._cfg.max_bytes}")
        data = bytearray()
        while True:
            # Per-read waits are bounded by botocore's read_timeout; the deadline between chunks.
            deadline.cap(self._cfg.read_timeout_s)
            try:
                chunk = body.read(_CHUNK)
            except Exception as err:  # noqa: BLE001 - timeouts, resets, short reads
                timed_out = "Timeout" in type(err).__name__ or isinstance(err, TimeoutError)
                if timed_out and deadline.remaining() <= 0:
                    raise FetchError(TIMEOUT, f"deadline exceeded reading body: {err}") from err
                raise _BodyRetryable(TIMEOUT if timed_out else FETCH_ERROR, f"{type(err).__name__}: {err}") from err
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > self._cfg.max_bytes:  # the length header can be missing or wrong
                raise FetchError(TOO_LARGE, f"body exceeds max_bytes {self._cfg.max_bytes}")


def _classify(err: Exception) -> FetchError:
    """Map a botocore/boto3 failure (after botocore's own retries) to a status."""
    from botocore import exceptions as bce

    name = f"{type(err).__name__}: {err}"
    if isinstance(err, bce.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        http = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        for status, codes in ((NOT_FOUND, _NOT_FOUND), (ACCESS_DENIED, _DENIED), (THROTTLED, _THROTTLED)):
            if code in codes or http in codes:
                return FetchError(status, f"s3 {code or http}: {err}")
        return FetchError(FETCH_ERROR, f"s3 {code or http}: {err}")
    if isinstance(err, (bce.ReadTimeoutError, bce.ConnectTimeoutError)):
        return FetchError(TIMEOUT, name)
    if isinstance(err, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return FetchError(ACCESS_DENIED, f"no usable AWS credentials: {err}")
    if isinstance(err, bce.ParamValidationError):
        return FetchError(BAD_URI, name)
    return FetchError(FETCH_ERROR, name)

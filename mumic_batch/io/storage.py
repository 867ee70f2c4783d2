"""Model-artifact storage: make an artifact directory (or one file) available on local disk.

Local paths and file:// URIs are returned as they are. s3:// prefixes are copied with boto3 into a
local cache (default ~/.cache/mumic_batch, or $MUMIC_CACHE_DIR). A cached copy is reused only
while the remote listing (keys, sizes, ETags) is unchanged, and every copy is written to a
temporary directory and renamed into place, so concurrent Python workers on one executor never
see a half-written artifact. Integrity (sha256) is checked by the model loader, not here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_LISTING_FILE = ".s3-listing.json"
_MAX_OBJECTS = 1000  # an artifact is a manifest plus a few files; more means a wrong prefix


class StorageError(OSError):
    """An artifact location cannot be read: bad URI, nothing at the prefix, or an unsafe object key."""


def is_s3(uri: str) -> bool:
    """True for s3:// (and s3a://) URIs."""
    return uri.startswith(("s3://", "s3a://"))


def split_s3(uri: str) -> tuple[str, str]:
    """Split an s3:// URI into (bucket, key or prefix without a leading slash)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
        raise StorageError(f"not an s3 URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def default_cache_dir() -> Path:
    """Where s3 artifacts are cached: $MUMIC_CACHE_DIR or ~/.cache/mumic_batch."""
    return Path(os.environ.get("MUMIC_CACHE_DIR") or Path.home() / ".cache" / "mumic_batch")


def _local_path(uri: str) -> Path:
    """Path of a local URI (plain path or file://)."""
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


def _s3_client(client: Any | None) -> Any:
    """The given client, or a default boto3 S3 client (region, endpoint, credentials from the environment)."""
    if client is not None:
        return client
    import boto3  # imported lazily: local-only runs never need it

    return boto3.client("s3")


def _list_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Relative key -> {size, etag} for every object under `prefix/`."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    listing: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if not rel or rel.endswith("/"):
                continue  # "directory" placeholder objects
            listing[_safe_relative(rel, obj["Key"])] = {"size": obj["Size"], "etag": obj["ETag"]}
            if len(listing) > _MAX_OBJECTS:
                raise StorageError(f"more than {_MAX_OBJECTS} objects under s3://{bucket}/{prefix}")
    if not listing:
        raise StorageError(f"no objects under s3://{bucket}/{prefix}")
    return listing


def _safe_relative(rel: str, key: str) -> str:
    """Refuse keys that would land outside the cache directory (.., absolute, empty parts)."""
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or rel.startswith("/") or "//" in rel:
        raise StorageError(f"unsafe object key {key!r}")
    return rel


def _cache_slot(cache_dir: Path, bucket: str, prefix: str) -> Path:
    """A flat, collision-free cache directory name for one s3 prefix."""
    digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
    name = PurePosixPath(prefix.rstrip("/")).name or bucket
    return cache_dir / f"{name}-{digest}"


def _read_listing(slot: Path) -> dict[str, Any] | None:
    """The listing a cached copy was made from, or None when there is no complete copy."""
    try:
        return json.loads((slot / _LISTING_FILE).read_text())
    except (OSError, ValueError):
        return None


def _download(client: Any, bucket: str, prefix: str, listing: dict[str, Any], slot: Path) -> None:
    """Download every listed object into a temp dir beside `slot`, then rename it into place."""
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slot.name}.", dir=slot.parent))
    try:
        base = prefix.rstrip("/") + "/" if prefix else ""
        for rel in listing:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, base + rel, str(target))
        (tmp / _LISTING_FILE).write_text(json.dumps(listing, sort_keys=True))
        if slot.exists():
            stale = slot.with_name(f".{slot.name}.stale-{os.getpid()}")
            os.replace(slot, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, slot)
    except OSError:
        if _read_listing(slot) == listing:
            return  # another worker finished the same copy first; use theirs
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def localize_dir(uri: str, cache_dir: str | os.PathLike[str] | None = None, client: Any | None = None) -> Path:
    """Local directory holding the artifact at `uri` (local path, file:// or s3:// prefix)."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"artifact directory not found: {path}")
        return path
    bucket, prefix = split_s3(uri)
    client = _s3_client(client)
    listing = _list_objects(client, bucket, prefix)
    slot = _cache_slot(Path(cache_dir) if cache_dir else default_cache_dir(), bucket, prefix)
    if _read_listing(slot) == listing:
        log.info("using cached copy of %s at %s", uri, slot)
        return slot
    log.info("copying %d objects from %s to %s", len(listing), uri, slot)
    _download(client, bucket, prefix, listing, slot)
    return slot


def localize_file(uri: str, cache_dir: str | os.PathLike[str] | None = None, client: Any | None = None) -> Path:
    """Local path of one file (local path, file:// or s3:// object), e.g. a CLIP checkpoint."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        return path
    bucket, key = split_s3(uri)
    parent, _, name = key.rpartition("/")
    client = _s3_client(client)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError: 404, 403, ...
        raise FileNotFoundError(f"s3 object not readable: {uri}: {exc}") from exc
    listing = {_safe_relative(name, key): {"size": head["ContentLength"], "etag": head["ETag"]}}
    slot = _cache_slot(Path(cache_dir) if cache_dir else default_cache_dir(), bucket, key)
    if _read_listing(slot) != listing:
        log.info("copying %s to %s", uri, slot)
        _download(client, bucket, parent, listing, slot)
    return slot / name


def read_member(uri: str, name: str, max_bytes: int, client: Any | None = None) -> bytes:
    """The bytes of one small file `name` of the artifact at `uri`, without copying the rest."""
    size, chunks = _open_member(uri, name, client)
    if size > max_bytes:
        raise StorageError(f"{uri}/{name}: {size} bytes, more than the {max_bytes} allowed")
    return b"".join(chunks)


def sha256_member(uri: str, name: str, client: Any | None = None, block: int = 8 << 20) -> tuple[int, str]:
    """(size, hex sha256) of file `name` of the artifact at `uri`, streamed once and never stored."""
    digest, size = hashlib.sha256(), 0
    for chunk in _open_member(uri, name, client, block)[1]:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _open_member(uri: str, name: str, client: Any | None, block: int = 1 << 20) -> tuple[int, Any]:
    """(size, iterator over the bytes) of file `name` under a local directory or an s3 prefix."""
    rel = _safe_relative(name, name)
    if not is_s3(uri):
        path = _local_path(uri) / rel
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")

        def local_chunks():
            with path.open("rb") as f:
                while chunk := f.read(block):
                    yield chunk

        return path.stat().st_size, local_chunks()
    bucket, prefix = split_s3(uri)
    key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
    try:
        obj = _s3_client(client).get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError: 404, 403, ...
        raise FileNotFoundError(f"s3 object not readable: s3://{bucket}/{key}: {exc}") from exc
    return int(obj["ContentLength"]), obj["Body"].iter_chunks(block)

"""Parse catalogue URIs (file://, plain paths, s3://, http(s)://) into checked parts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from mumic_batch.core.status import BAD_URI, ImageError
from mumic_batch.io.addresses import normalise_host

# A scheme needs two or more characters so a Windows-style "C:" never reads as one.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_S3_ALIASES = {"s3": "s3", "s3a": "s3", "s3n": "s3"}  # Spark writes s3a:// URIs
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,253}[A-Za-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
# Characters kept as they are in an http request target; everything else is percent-encoded.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"


@dataclass(frozen=True)
class ParsedUri:
    """One URI split into what its reader needs."""

    scheme: str  # file | s3 | http | https, or the unsupported scheme as written (lower case)
    raw: str  # the URI as given
    path: str = ""  # file: local path; s3: object key; http(s): request target (path?query)
    host: str = ""  # s3: bucket; http(s): normalised host name or IP literal
    port: int = 0  # http(s) port


def parse_uri(uri: object) -> ParsedUri:
    """Split `uri`; raises ImageError(BAD_URI) when it is malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise ImageError(BAD_URI, f"not a non-empty string: {uri!r}")
    if "\x00" in uri:
        raise ImageError(BAD_URI, "NUL character in uri")
    match = _SCHEME.match(uri)
    if match is None:
        return ParsedUri("file", uri, path=uri)
    scheme = match.group(1).lower()
    if scheme == "file":
        return _parse_file(uri)
    if scheme in _S3_ALIASES:
        return _parse_s3(uri, match.end())
    if scheme in ("http", "https"):
        return _parse_http(uri, scheme)
    return ParsedUri(scheme, uri)


def _parse_file(uri: str) -> ParsedUri:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(BAD_URI, f"file uri names a remote host {parts.netloc!r}")
    if parts.query or parts.fragment or not parts.path:
        raise ImageError(BAD_URI, "file uri needs a path and no ?query or #fragment (percent-encode them)")
    return ParsedUri("file", uri, path=unquote(parts.path))


def _parse_s3(uri: str, scheme_end: int) -> ParsedUri:
    # Split by hand: keys may hold '?', '#' and '%', which urlsplit would cut or decode.
    rest = uri[scheme_end:]
    if not rest.startswith("//"):
        raise ImageError(BAD_URI, "s3 uri must look like s3://bucket/key")
    bucket, _, key = rest[2:].partition("/")
    if not _BUCKET.match(bucket) or not key:
        raise ImageError(BAD_URI, "s3 uri must look like s3://bucket/key")
    return ParsedUri("s3", uri, path=key, host=bucket)


def _parse_http(uri: str, scheme: str) -> ParsedUri:
    # Control characters and backslashes are parsed differently by different URL parsers.
    if _CONTROL.search(uri):
        raise ImageError(BAD_URI, "control character or backslash in url")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as err:
        raise ImageError(BAD_URI, f"malformed url: {err}") from err
    if "@" in parts.netloc:
        # user@host hides the real host from a reader's eye and would leak credentials anyway.
        raise ImageError(BAD_URI, "credentials (user@host) in url are not accepted")
    if not parts.hostname or port == 0:
        raise ImageError(BAD_URI, "url has no host or port 0")
    host = normalise_host(parts.hostname)  # percent-encoded hosts fail its character check
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    default_port = 443 if scheme == "https" else 80
    return ParsedUri(scheme, uri, path=quote(target, safe=_TARGET_SAFE), host=host, port=port or default_port)

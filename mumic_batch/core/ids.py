"""Stable image ids: the same URI string always maps to the same id, on every machine."""

from __future__ import annotations

import hashlib

ID_HEX_CHARS = 16  # 64 bits: collisions stay negligible far beyond 10^9 images


def image_id_for(uri: str) -> str:
    """First 16 hex characters of the SHA-1 of the URI string, exactly as given (no normalisation)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]

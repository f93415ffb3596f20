"""One way to turn a JSON-able description into a stable identity (run ids, cache keys)."""

from __future__ import annotations

import hashlib
import json


def digest(obj) -> str:
    """SHA-1 hex digest of `obj` as canonical JSON (sorted keys; non-JSON values by str())."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

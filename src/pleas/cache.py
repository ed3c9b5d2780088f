"""Where pleas keeps generated data and trained weights, and how it names the files.

The cache directory is ``$PLEAS_CACHE`` if set, else ``~/.cache/pleas``. Files are named by a stable
hash of a JSON-serialisable key and written atomically (:func:`pleas.files.atomic_write`), so an
interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .files import atomic_write  # noqa: F401  (the cache's writer, re-exported for its users)

#: Bumped when the meaning of cached files changes, so old files are not reused by mistake.
CACHE_FORMAT = 1


def cache_dir(*parts: str) -> Path:
    """The cache directory (``$PLEAS_CACHE`` or ``~/.cache/pleas``) joined with ``parts``, created if missing."""
    root = os.environ.get("PLEAS_CACHE") or os.path.join("~", ".cache", "pleas")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def canonical_json(key: Any) -> str:
    """``key`` as JSON with sorted keys and no whitespace; the same for equal keys across runs.

    Allowed values are dicts with string keys, lists, tuples (stored as lists), str, int, float, bool
    and None.
    """

    def check(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(
                        f"cache key {where} has a key {k!r} of type {type(k).__name__}; only str keys are allowed"
                    )
                check(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(
                f"cache key {where} is a {type(value).__name__}; allowed are dict, list, tuple, str, int, "
                "float, bool and None"
            )

    check(key, "key")
    return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)


def stable_hash(key: Any, *, length: int = 16) -> str:
    """A hex digest of ``key`` (see :func:`canonical_json`) that is stable across processes and runs."""
    payload = f"pleas-cache-v{CACHE_FORMAT}:" + canonical_json(key)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]

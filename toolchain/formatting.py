"""Small, dependency-free helpers that several layers share: content hashes and number formatting.
They live here (a leaf module) so the engine needs neither the recipe schema's module nor the
report command for them."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """Content hash of a JSON-able object; keys sorted so dict order does not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def si(value: float) -> str:
    """12_345_678 -> '12.35M': parameter and MAC counts in tables."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"

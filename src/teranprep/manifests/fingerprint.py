"""Parameter fingerprints: the sha256 of a canonical JSON rendering of the parameters that shape an output."""

from __future__ import annotations

import hashlib
import json


def fingerprint(params: dict) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

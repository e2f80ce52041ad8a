"""Merging a user's YAML settings over defaults: unknown keys are refused by name."""

from __future__ import annotations

import copy

from .errors import PrepError


def merge_settings(base: dict, override: dict | None, where: str, opaque=()) -> dict:
    """`base` with `override` applied recursively; keys in `opaque` are replaced whole."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in base:
            raise PrepError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and key not in opaque:
            if not isinstance(value, dict):
                raise PrepError(f"{where}: {key!r} must be a mapping")
            out[key] = merge_settings(base[key], value, f"{where}: {key}", opaque)
        else:
            out[key] = copy.deepcopy(value)
    return out

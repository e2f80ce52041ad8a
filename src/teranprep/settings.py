"""Merging a user's YAML settings over defaults (unknown keys are refused by name), and finding
a config by path or by a bundled config's name."""

from __future__ import annotations

import copy
from pathlib import Path

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


# Bundled configs (src/teranprep/configs, shipped as package data; configs/ at the repo root links
# to them), by kind: the prefix of their names, the command that takes them, what they configure.
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_KINDS = {"teran": ("teran_", "prep train --config", "TERAN"),
                "detector": ("detector_", "prep train-detector --config", "detector")}


def bundled_configs(kind: str) -> list[str]:
    """The names of the bundled configs of `kind` ('teran' or 'detector')."""
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob(f"{CONFIG_KINDS[kind][0]}*.yaml"))


def _bundled_kind(path: Path) -> str | None:
    """The kind of the bundled config `path` is (itself, a link to it, or a copy), else None."""
    for kind in CONFIG_KINDS:
        for name in bundled_configs(kind):
            bundled = BUNDLED_CONFIGS / f"{name}.yaml"
            try:
                if path.resolve() == bundled or (path.name == bundled.name
                                                 and path.read_bytes() == bundled.read_bytes()):
                    return kind
            except OSError:
                return None
    return None


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """A YAML file, or the name of a bundled config of `kind` (`teran_small`, `detector_tiny.yaml`).
    Unknown names list only the bundled configs of `kind`; a bundled config of the other kind (by
    name or by path) is named as such, with the command that takes it."""
    path = Path(name_or_path)
    known = bundled_configs(kind)
    what = CONFIG_KINDS[kind][2]

    def wrong_kind(other: str) -> PrepError:
        return PrepError(f"{name_or_path}: a bundled config of another kind (for `{CONFIG_KINDS[other][1]}`), "
                         f"not a {what} config; pass one of {known}")
    if path.is_file():
        found = _bundled_kind(path)
        if found is not None and found != kind:
            raise wrong_kind(found)
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = BUNDLED_CONFIGS / f"{stem}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        if stem in known:
            return bundled
        found = _bundled_kind(bundled)
        if found is not None:
            raise wrong_kind(found)
    raise PrepError(f"{name_or_path}: no such config file; pass a YAML path or one of {known}")

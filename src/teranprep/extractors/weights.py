"""Detector state dicts from checkpoint files (through the safe loader) and their sha256."""

from __future__ import annotations

from pathlib import Path


from ..errors import PrepError
from ..safe_torch import load_torch_file
from ..manifests.atomic import sha256_file


def load_state_dict_file(path) -> dict:
    """A state dict from a file holding it bare or under 'model' / 'state_dict'."""
    obj = load_torch_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise PrepError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def state_dict_sha256(path) -> str:
    return sha256_file(Path(path))

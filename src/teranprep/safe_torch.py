"""Loading torch checkpoint files safely: torch.load with weights_only, never unrestricted unpickling."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import PrepError


def load_torch_file(path, extra_safe_globals=(), expected="a torch checkpoint", mmap: bool = False):
    """torch.load with weights_only=True; a file that needs arbitrary code is refused by name, and
    anything that is not a torch checkpoint at all (text, truncated, another format) gets one line.
    `mmap`: tensors stay pages of the file until read (a zip-format file; a legacy one is read
    whole), so what a caller never touches (a run's optimizer state) costs no memory."""
    from .filetypes import describe_file
    path = Path(path)
    if path.is_dir():
        raise PrepError(f"{path}: is a folder; expected {expected} file")
    if not path.is_file():
        raise PrepError(f"{path}: checkpoint not found; pass an existing file to --weights")
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrepError(f"{path}: refused to load: the checkpoint needs objects outside plain "
                        f"tensors and containers ({first}); re-save it as a plain state dict") from exc
    except Exception as exc:  # noqa: BLE001 - torch.load on a non-checkpoint raises anything (KeyError: 101 on text)
        raise PrepError(f"{path}: is {describe_file(path)}, not {expected} that loads "
                        f"({type(exc).__name__}); pass the right file (a truncated download? "
                        "download it again)") from exc

"""TERAN checkpoints: their format name and file names, and the loader every consumer uses
(eval, index, search, shortlist, show-alignment): a teranprep run or an original TERAN file."""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import PrepError

CHECKPOINT_FORMAT = "teranprep.teran-checkpoint"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


def checkpoint_path(source: Path) -> Path:
    """A run directory's best checkpoint (else its last), or the file itself."""
    source = Path(source)
    if source.is_dir():
        for name in (BEST, LAST):
            if (source / name).is_file():
                return source / name
        raise PrepError(f"{source}: no {BEST} or {LAST}; train into it with `prep train` first")
    if not source.is_file():
        raise PrepError(f"{source}: no such run directory or checkpoint file")
    return source


def load_model(source: Path, device="cpu", text_encoder: Path | None = None):
    """(model in eval mode, checkpoint metadata) from a teranprep run/checkpoint or an original
    TERAN checkpoint (model_best_rsum.pth.tar). `text_encoder`: a model directory whose
    config.json supplies what an original checkpoint does not record (--text-encoder). The
    metadata has no WEIGHT_KEYS: the file is memory-mapped, its weights copied into the model."""
    import torch
    from transformers import BertConfig, BertModel
    from ..safe_torch import load_torch_file
    from .model import TERAN
    from .reference_import import REFERENCE_SAFE_GLOBALS, convert_reference_checkpoint, is_reference_checkpoint

    path = checkpoint_path(source)
    raw = load_torch_file(path, extra_safe_globals=REFERENCE_SAFE_GLOBALS, mmap=True)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        if text_encoder is not None:
            raise PrepError(f"--text-encoder applies to original TERAN checkpoints only; {path} "
                            "records its text encoder's configuration: drop the option")
        ckpt = raw
    elif is_reference_checkpoint(raw):
        ckpt = convert_reference_checkpoint(raw, path, text_encoder=text_encoder)
    else:
        raise PrepError(f"{path}: neither a teranprep checkpoint nor an original TERAN checkpoint "
                        "(dict with 'model' and 'config'); pass RUN/checkpoint_best.pt")
    text = BertModel(BertConfig.from_dict(ckpt["text_config"]), add_pooling_layer=False)
    model = TERAN(ckpt["config"], ckpt["feature_dim"], text)
    copy_weights_in(model, ckpt["model"], path)
    # A run's optimizer state (2x the weights in Adam's moments) is never read in, and the
    # metadata returned does not hold it (at teran_coco's size ~2.5 GB, held for a whole eval
    # or a search server before).
    del raw
    # what else holds tensors (the RNG states) is copied out of the mapping, so that none of it
    # stays mapped once `raw` and `ckpt` are gone
    from torch.utils._pytree import tree_map
    meta = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                    {k: v for k, v in ckpt.items() if k not in WEIGHT_KEYS})
    del ckpt
    return model.to(device).eval(), meta


def copy_weights_in(model, state: dict, path: Path) -> None:
    """model.load_state_dict(state), strict, and as each tensor is copied in, the pages of the
    memory-mapped file it came from are handed back (madvise DONTNEED: the file is only read,
    so they could be read in again, and never are). Loading then costs the model plus one tensor,
    not the model plus the file's weights: 0.85 GB less at teran_coco's size. The model's
    tensors are its own memory afterwards: nothing of the file stays mapped once the checkpoint
    is dropped (a file replaced under a running server cannot change or fault its weights)."""
    import torch
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys()
                   if not torch.is_tensor(state[k]) or state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong)) if names]
        raise PrepError(f"{path}: its weights do not fit the model its config describes ("
                        + "; ".join(parts) + "): pass a checkpoint written by prep train")
    mapped = _mapped_ranges(path)
    with torch.no_grad():
        for name, mine in own.items():
            mine.copy_(state[name])
            _drop_pages(state[name], mapped)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges at which `path` is mapped into this process (Linux; else none)."""
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return [tuple(int(a, 16) for a in line.split()[0].split("-"))
                    for line in fh if line.rstrip("\n").endswith(target)]
    except OSError:
        return []


def _drop_pages(t, mapped: list[tuple[int, int]]) -> None:
    """madvise(DONTNEED) on the whole pages of `t` that lie in a private mapping of the
    checkpoint file (never on anonymous memory, which that would zero)."""
    import mmap
    page = mmap.PAGESIZE
    if not t.is_contiguous():
        return
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi <= lo or not any(a <= lo and hi <= b for a, b in mapped):
        return
    libc = _libc()
    if libc is not None:
        import ctypes
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (not once per tensor); None where there is none."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") else None
    except OSError:
        return None


# What load_model drops from the checkpoint it returns (the model holds the weights).
WEIGHT_KEYS = ("model", "optimizer", "scheduler", "scaler")

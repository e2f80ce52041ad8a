"""Torch's intra-op thread count for a block of work, always restored afterwards.

Float results depend on the thread count (reductions are split differently), so code and tests
that need the same bits as a shard task run under the same count, and nothing leaks the change.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_threads(n: int | None):
    """Runs the block with torch.set_num_threads(n) (None or 0: unchanged), then restores it."""
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)

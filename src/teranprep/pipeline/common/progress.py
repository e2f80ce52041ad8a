"""The progress of batch stages: a bar on a terminal (images/s, ok/error counts, ETA); off a
terminal (nohup, CI logs) one plain line every PROGRESS_SECONDS; nothing with --quiet."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def progress_seconds() -> float:
    """Seconds between plain progress lines off a terminal ($TERANPREP_PROGRESS_SECONDS, 30)."""
    try:
        return max(0.0, float(os.environ.get("TERANPREP_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ExtractProgress:
    """Counts per shard, so a retried shard that starts again from zero is not counted twice."""

    def __init__(self, total: int, quiet: bool = False, unit: str = "img", label: str = "progress",
                 counts: bool = True):
        self.ok = 0
        self.errors = 0
        self.total, self.unit, self.label, self.counts = total, unit, label, counts
        self._per_shard: dict = {}
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=unit, disable=quiet or not terminal,
                        dynamic_ncols=True, smoothing=0.1)
        self._lines = not quiet and not terminal
        self._every = progress_seconds()
        self._start = self._last = time.monotonic()

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._lines or (not force and now - self._last < self._every):
            return
        self._last = now
        done = self.ok + self.errors
        rate = done / (now - self._start) if now > self._start else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 and self.total >= done else "?"
        counts = f" ({self.ok} ok, {self.errors} errors)" if self.counts else ""
        print(f"{self.label}: {done}/{self.total} {self.unit}{counts}, "
              f"{rate:.2f} {self.unit}/s, ETA {eta}", file=sys.stderr, flush=True)

    def _show(self):
        if self.counts:
            self.bar.set_postfix(ok=self.ok, errors=self.errors, refresh=False)

    def shard_progress(self, payload: dict) -> None:
        """payload: {shard, done, errors} cumulative within that shard."""
        old_done, old_errors = self._per_shard.get(payload["shard"], (0, 0))
        self._per_shard[payload["shard"]] = (payload["done"], payload["errors"])
        d_done, d_err = payload["done"] - old_done, payload["errors"] - old_errors
        self.errors += d_err
        self.ok += d_done - d_err
        self._show()
        self.bar.update(d_done)
        self._line()

    def shard_done(self, stats: dict) -> None:
        """A finished shard's stats: the final word on its counts, whatever events were lost."""
        rows = stats["rows"]
        index = int(stats["shard"].rsplit("-", 1)[1].split(".")[0])
        self.shard_progress({"shard": index, "done": len(rows),
                             "errors": sum(r["status"] == "error" for r in rows)})

    def close(self) -> None:
        self.bar.close()

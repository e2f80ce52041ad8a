"""The progress bar of batch stages: images/s, ok/error counts, ETA; silent off a TTY or with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ExtractProgress:
    """Counts per shard, so a retried shard that starts again from zero is not counted twice."""

    def __init__(self, total: int, quiet: bool = False, unit: str = "img"):
        self.ok = 0
        self.errors = 0
        self._per_shard: dict = {}
        self.bar = tqdm(total=total, unit=unit, disable=quiet or not sys.stderr.isatty(),
                        dynamic_ncols=True, smoothing=0.1)

    def _show(self):
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

    def shard_done(self, stats: dict) -> None:
        """A finished shard's stats: the final word on its counts, whatever events were lost."""
        rows = stats["rows"]
        index = int(stats["shard"].rsplit("-", 1)[1].split(".")[0])
        self.shard_progress({"shard": index, "done": len(rows),
                             "errors": sum(r["status"] == "error" for r in rows)})

    def close(self) -> None:
        self.bar.close()

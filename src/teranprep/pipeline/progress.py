"""The progress bar of batch stages: images/s, ok/error counts, ETA; silent off a TTY or with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ExtractProgress:
    def __init__(self, total: int, quiet: bool = False, unit: str = "img"):
        self.ok = 0
        self.errors = 0
        self.bar = tqdm(total=total, unit=unit, disable=quiet or not sys.stderr.isatty(),
                        dynamic_ncols=True, smoothing=0.1)

    def _show(self):
        self.bar.set_postfix(ok=self.ok, errors=self.errors, refresh=False)

    def update_batch(self, n: int, n_errors: int) -> None:
        self.ok += n - n_errors
        self.errors += n_errors
        self._show()
        self.bar.update(n)

    def update_shard(self, stats: dict) -> None:
        rows = stats["rows"]
        self.update_batch(len(rows), sum(r["status"] == "error" for r in rows))

    def close(self) -> None:
        self.bar.close()

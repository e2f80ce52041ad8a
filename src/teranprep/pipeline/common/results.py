"""What a stage that writes features/ returns: counts read back from the manifest it wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FeaturesResult:
    out: Path
    n_images: int
    n_ok: int
    n_error: int
    n_shards: int
    shards_run: int
    wall_s: float
    manifest: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, out: Path, manifest: dict, shards_run: int, wall_s: float, **extra):
        counts = manifest["counts"]
        return cls(out, manifest["input"]["n_images"], counts["ok"], counts["error"],
                   len(manifest["shards"]), shards_run, wall_s, manifest, **extra)

"""A stage's outcome in its manifest: `"status": "failed"` + the reason, and the refusal downstream.

A stage that fails after writing its manifest (extract-regions / import-features past
--max-error-rate) marks it failed; a later run of the same stage that passes removes the mark
again (same bytes as before, so lineage hashes come back). Every reader of a failed manifest
(build-splits, train, eval, index, export, show-regions: all through read_features_manifest)
refuses it in one line; `prep verify` reports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PrepError

FAILED = "failed"


def mark_outcome(manifest_path: Path, failure: str | None) -> None:
    """Records `failure` (one line) in the manifest at `manifest_path`, or clears a recorded one
    when `failure` is None. Rewrites the file (atomically, canonical JSON) only on a change."""
    from .atomic import atomic_write_bytes, canonical_json
    path = Path(manifest_path)
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return  # nothing (readable) to mark: the stage's own error line says what happened
    if failure is None:
        if "status" not in manifest and "failure" not in manifest:
            return
        manifest.pop("status", None)
        manifest.pop("failure", None)
    else:
        if manifest.get("status") == FAILED and manifest.get("failure") == failure:
            return
        manifest.update(status=FAILED, failure=failure)
    atomic_write_bytes(path, canonical_json(manifest))


def refuse_failed(manifest: dict, path: Path) -> dict:
    """`manifest` unchanged, or one PrepError line when the stage that wrote it failed."""
    if isinstance(manifest, dict) and manifest.get("status") == FAILED:
        stage = manifest.get("stage", "the stage")
        raise PrepError(f"{path}: written by a failed {stage} run ({manifest.get('failure', 'no reason recorded')}); "
                        f"fix its inputs and re-run {stage} (or raise its --max-error-rate) before using it")
    return manifest

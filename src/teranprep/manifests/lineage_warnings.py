"""Warnings that travel with data: features from random weights stay labelled downstream.

extract-regions --random-weights marks its features manifest (detector.random_weights). Every
stage that consumes such features, or a run trained on them, prints one warning line on stderr
(whatever --quiet says) and records it in what it writes: `"random_weights": true` and a
`"warnings"` list (splits manifest, run lineage.json + checkpoints + metrics.jsonl validation
records, eval metrics.json, export.json).
"""

from __future__ import annotations

from pathlib import Path

RANDOM_WEIGHTS_KEY = "random_weights"
WARNINGS_KEY = "warnings"


def features_warnings(features_dir: Path, manifest: dict) -> list[str]:
    """The warnings a stage reading the features in `features_dir` (manifest given) inherits."""
    if not (manifest.get("detector") or {}).get(RANDOM_WEIGHTS_KEY):
        return []
    return [f"{Path(features_dir).resolve()}: features from random weights (their manifest says: "
            "meaningless, never to train or evaluate a model); everything made from them is "
            "meaningless too"]


def recorded_warnings(record: dict | None) -> list[str]:
    """The warnings an earlier stage recorded (a splits manifest, a run's lineage)."""
    return list((record or {}).get(WARNINGS_KEY) or [])


def merge(*lists: list[str]) -> list[str]:
    """The warnings of several inputs, each once, in order."""
    return list(dict.fromkeys(w for warnings in lists for w in warnings))


def warning_fields(warnings: list[str]) -> dict:
    """What a stage adds to its own manifest / metrics: nothing when there is nothing to say."""
    if not warnings:
        return {}
    return {RANDOM_WEIGHTS_KEY: True, WARNINGS_KEY: list(warnings)}


def emit(stage: str, warnings: list[str]) -> None:
    """One `warning: STAGE: ...` line per warning on stderr; never silenced by --quiet."""
    import click
    for warning in warnings:
        click.echo(f"warning: {stage}: {warning}", err=True)

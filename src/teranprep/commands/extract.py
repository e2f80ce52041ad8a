"""CLI: extract-regions and verify."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli import main


def _default_model():
    from ..extractors import DEFAULT_MODEL
    return DEFAULT_MODEL


@main.command("extract-regions")
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default=_default_model, show_default=True,
              help="Detector name (see `prep weights list`).")
@click.option("--weights", type=click.Path(path_type=Path), help="Checkpoint file of the detector.")
@click.option("--random-weights", "random_weights", type=int, metavar="SEED",
              help="Deterministic random weights, for smoke tests: the features are MEANINGLESS.")
@click.option("--batch-size", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--shard-size", default=1000, show_default=True, help="Images per HDF5 shard.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--conf-thresh", default=0.2, show_default=True)
@click.option("--min-boxes", default=10, show_default=True)
@click.option("--max-boxes", default=100, show_default=True)
@click.option("--limit", type=int, help="Only the first N images (in key order).")
@click.option("--workers", default=1, show_default=True,
              help="Local dask worker processes (0 = run in this process, no dask).")
@click.option("--scheduler", help="tcp://HOST:PORT of an existing dask.distributed scheduler.")
@click.option("--threads-per-worker", type=int, help="torch threads per task (default 1: byte-identical features for any --workers).")
@click.option("--retries", default=2, show_default=True, help="Retries of a failed shard task.")
@click.option("--max-error-rate", default=0.01, show_default=True)
@click.option("--overwrite", is_flag=True, help="Delete previous outputs in OUT and start afresh.")
@click.option("--dry-run", is_flag=True, help="Print the shard plan and exit.")
@click.option("--quiet", is_flag=True)
def extract_regions_cmd(images, out, weights, random_weights, quiet, **options):
    """Detect regions in every image under IMAGES and write HDF5 shards + index + manifest to OUT."""
    from ..pipeline.extract import extract_regions
    result = extract_regions(images, out, weights=str(weights) if weights else None,
                             random_weights=random_weights, quiet=quiet, echo=click.echo, **options)
    if not options["dry_run"]:
        click.echo(result.summary())


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def verify_cmd(path):
    """Check an output directory (features/): hashes, counts, offsets, index consistency."""
    from ..pipeline.verify import verify
    report = verify(path)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    for line in report.problems:
        click.echo(f"problem: {line}", err=True)
    if not report.ok:
        click.echo(f"verify: {len(report.problems)} problem(s) in {path}", err=True)
        sys.exit(1)
    click.echo(f"verify: {path} is consistent ({len(report.checked)} files checked)")

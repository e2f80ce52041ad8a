"""CLI: weights list / weights path (the named-weights registry) and show-regions."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main


@main.group("weights")
def weights_group():
    """Named detector weights: where they come from and where the cache expects them."""


@weights_group.command("list")
def weights_list():
    """Every named weights entry: architecture, box policy, format, cache state, URL."""
    from ..extractors.registry import WEIGHTS, weights_path
    for name, e in sorted(WEIGHTS.items()):
        state = "cached" if weights_path(name).is_file() else "absent"
        click.echo(f"{name}\t{e.architecture}\tboxes {e.min_boxes}..{e.max_boxes}\t{e.format}\t{state}\t"
                   f"sha256 {e.sha256 or 'unknown'}\t{e.url}")


@weights_group.command("path")
@click.argument("name")
def weights_path_cmd(name):
    """Where NAME's file belongs in the cache ($TERANPREP_CACHE or ~/.cache/teranprep/weights)."""
    from ..extractors.registry import weights_path
    click.echo(str(weights_path(name)))


@main.command("show-regions")
@click.argument("features", type=click.Path(path_type=Path))
@click.argument("image_keys", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the PNGs.")
@click.option("--images", "images_root", type=click.Path(path_type=Path),
              help="Image root (default: the input root recorded in the features manifest).")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names, one per line (id order).")
@click.option("--attr-labels", type=click.Path(path_type=Path), help="Attribute names, one per line.")
@click.option("--max-boxes", default=36, show_default=True, help="Draw at most this many boxes per image.")
def show_regions_cmd(features, image_keys, out_dir, images_root, labels, attr_labels, max_boxes):
    """Draw the saved boxes of IMAGE_KEYS (from FEATURES) with their labels into PNGs."""
    from ..pipeline.regions import show_regions
    for path in show_regions(features, image_keys, out_dir, images_root=images_root, labels=labels,
                             attr_labels=attr_labels, max_boxes=max_boxes):
        click.echo(str(path))

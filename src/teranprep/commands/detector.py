"""CLI: weights list / weights path (the named-weights registry), train-detector and show-regions."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main, quiet_option, stage_echo, say


@main.group("weights")
def weights_group():
    """Named detector weights: where they come from and where the cache expects them."""


@weights_group.command("list")
def weights_list():
    """Every named weights entry: architecture, box policy, format, cache state, URL."""
    from ..extractors.registry import LABEL_MAPS, WEIGHTS, cache_dir, weights_path
    for name, e in sorted(WEIGHTS.items()):
        state = "cached" if weights_path(name).is_file() else "absent"
        click.echo(f"{name}\t{e.architecture}\tboxes {e.min_boxes}..{e.max_boxes}\t{e.format}\t{state}\t"
                   f"sha256 {e.sha256 or 'unknown'}\t{e.url}")
        if name in LABEL_MAPS:
            url, filename = LABEL_MAPS[name]
            click.echo(f"  label map\t{cache_dir() / filename}\t{url}")


@weights_group.command("path")
@click.argument("name")
def weights_path_cmd(name):
    """Where NAME's file belongs in the cache ($TERANPREP_CACHE or ~/.cache/teranprep/weights)."""
    from ..extractors.registry import weights_path
    click.echo(str(weights_path(name)))


@main.command("train-detector")
@click.argument("annotations", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="YAML settings, or a bundled detector config's name (detector_tiny); "
                   "default: built-in defaults.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--epochs", type=int, help="Override the config's epochs (more epochs continue a run).")
@click.option("--init-weights", type=click.Path(path_type=Path),
              help="A BUTD checkpoint to fine-tune from (heads of another size start fresh).")
@click.option("--overwrite", is_flag=True, help="Discard a previous run in --out.")
@quiet_option
def train_detector_cmd(annotations, images, config, out, epochs, init_weights, overwrite, quiet):
    """Train a BUTD-family detector on COCO boxes (classes + attributes) in ANNOTATIONS.

    IMAGES is the folder the file_name paths are relative to. Resumes from OUT/last.pth; prints
    validation mAP@0.5 per epoch; OUT/model_final.pth loads with `prep extract-regions --weights`.
    """
    from ..interrupts import resumable
    from ..settings import resolve_config
    if config is not None:
        config = resolve_config(config, "detector")  # refused before torch is imported
    from ..pipeline.train_detector import train_detector
    overrides = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if init_weights is not None:
        overrides["init_weights"] = str(init_weights)
    with resumable(lambda: _detector_kept(out)):
        result = train_detector(annotations, images, config=config, out=out, overrides=overrides,
                                overwrite=overwrite, echo=stage_echo(quiet))
    say(result.summary())


def _detector_kept(out: Path) -> str:
    """What an interrupted train-detector leaves: the last finished epoch in OUT/last.pth."""
    from ..safe_torch import load_torch_file
    last = Path(out) / "last.pth"
    if not last.is_file():
        return f"no epoch had finished (nothing kept in {out})"
    return f"epoch {int(load_torch_file(last)['epoch'])} is saved in {last}"


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

"""CLI: make-synthetic, train-detector and demo (the offline end-to-end run)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main


@main.command("make-synthetic")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--images", default=1000, show_default=True, help="Number of scenes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=160, show_default=True, help="Image height in pixels (width 1-1.3x).")
@click.option("--captions-per-image", default=5, show_default=True)
@click.option("--val", type=int, help="Validation images (default 10%).")
@click.option("--test", type=int, help="Test images (default 10%).")
@click.option("--twin-rate", default=0.3, show_default=True,
              help="Share of scenes followed by a colour-swapped twin in the same split.")
@click.option("--image-format", type=click.Choice(["mix", "png", "jpeg"]), default="mix",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Delete a previous synthetic set in OUT first.")
def make_synthetic_cmd(out, **options):
    """Generate shape scenes with COCO boxes (OUT/instances.json) and captions (Karpathy JSON)."""
    from ..pipeline.synthetic import make_synthetic
    click.echo(make_synthetic(out, echo=click.echo, **options).summary())


@main.command("train-detector")
@click.argument("annotations", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="YAML settings (e.g. configs/detector_tiny.yaml); default: built-in defaults.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--epochs", type=int, help="Override the config's epochs (more epochs continue a run).")
@click.option("--init-weights", type=click.Path(path_type=Path),
              help="A BUTD checkpoint to fine-tune from (heads of another size start fresh).")
@click.option("--overwrite", is_flag=True, help="Discard a previous run in --out.")
def train_detector_cmd(annotations, images, config, out, epochs, init_weights, overwrite):
    """Train a BUTD-family detector on COCO boxes (classes + attributes) in ANNOTATIONS.

    IMAGES is the folder the file_name paths are relative to. Resumes from OUT/last.pth; prints
    validation mAP@0.5 per epoch; OUT/model_final.pth loads with `prep extract-regions --weights`.
    """
    from ..interrupts import resumable
    from ..pipeline.train_detector import train_detector
    overrides = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if init_weights is not None:
        overrides["init_weights"] = str(init_weights)
    with resumable(lambda: _detector_kept(out)):
        result = train_detector(annotations, images, config=config, out=out, overrides=overrides,
                                overwrite=overwrite, echo=click.echo)
    click.echo(result.summary())


def _detector_kept(out: Path) -> str:
    """What an interrupted train-detector leaves: the last finished epoch in OUT/last.pth."""
    from ..extractors.weights import load_torch_file
    last = Path(out) / "last.pth"
    if not last.is_file():
        return f"no epoch had finished (nothing kept in {out})"
    return f"epoch {int(load_torch_file(last)['epoch'])} is saved in {last}"


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--images", type=int, help="Synthetic scenes (default 600).")
@click.option("--quick", is_flag=True, help="The shortened run the tests use (a few minutes).")
@click.option("--seed", default=0, show_default=True)
@click.option("--min-r1", type=float, help="Bar: test R@1 both ways, in % (default: the demo's, printed).")
@click.option("--min-map", type=float, help="Bar: detector validation mAP@0.5 (default: the demo's).")
def demo_cmd(out, images, quick, seed, min_r1, min_map):
    """Run everything offline on generated scenes: make-synthetic -> train-detector ->
    extract-regions -> build-splits -> train -> eval, then draw a few regions and alignments."""
    from ..pipeline.demo import DemoSettings, check_demo_targets, run_demo
    settings = DemoSettings.quick() if quick else DemoSettings()
    settings.seed = seed
    if images is not None:
        settings.images = images
    if min_r1 is not None:
        settings.min_r1 = min_r1
    if min_map is not None:
        settings.min_map = min_map
    result = run_demo(out, settings, echo=click.echo)
    missed = check_demo_targets(result, settings.min_r1, settings.min_map)
    if missed:  # a demo below its bar is a failed run (CI runs `make demo`)
        click.echo(f"error: the demo missed its bar ({settings.bar()}): {'; '.join(missed)}", err=True)
        raise SystemExit(1)
    click.echo(f"demo bar met: {settings.bar()}")

"""CLI: make-synthetic and demo (the offline end-to-end run)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main, quiet_option, stage_echo


@main.command("make-synthetic")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--images", default=1000, show_default=True, help="Number of scenes.")
@click.option("--seed", default=0, show_default=True, help="Seed of every random draw (scenes, captions, splits).")
@click.option("--size", default=160, show_default=True, help="Image height in pixels (width 1-1.3x).")
@click.option("--captions-per-image", default=5, show_default=True, help="Captions written per scene.")
@click.option("--val", type=int, help="Validation images (default 10%).")
@click.option("--test", type=int, help="Test images (default 10%).")
@click.option("--twin-rate", default=0.3, show_default=True,
              help="Share of scenes followed by a colour-swapped twin in the same split.")
@click.option("--image-format", type=click.Choice(["mix", "png", "jpeg"]), default="mix",
              show_default=True, help="File format of the scenes (mix: PNG and JPEG).")
@click.option("--overwrite", is_flag=True, help="Delete a previous synthetic set in OUT first.")
@quiet_option
def make_synthetic_cmd(out, quiet, **options):
    """Generate shape scenes with COCO boxes (OUT/instances.json) and captions (Karpathy JSON)."""
    from ..pipeline.synthetic import make_synthetic
    click.echo(make_synthetic(out, echo=stage_echo(quiet), **options).summary())


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for every stage's output and the pictures.")
@click.option("--images", type=int, help="Synthetic scenes (default 600).")
@click.option("--quick", is_flag=True, help="The shortened run the tests use (a few minutes).")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic scenes and of training.")
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

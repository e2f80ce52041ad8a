"""CLI: train, eval and show-alignment (the bundled TERAN model)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main


@main.command("train")
@click.argument("splits", type=click.Path(path_type=Path))
@click.option("--config", "config",
              help="YAML file, or a bundled config name: teran_coco, teran_f30k, teran_small "
                   "(not needed with --resume: the run's own config is used).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (runs/NAME).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--features", type=click.Path(path_type=Path),
              help="Features directory (default: the one recorded in SPLITS/manifest.json).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--stop-after", type=int, help="Stop (and checkpoint) after this many steps.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="Matrix-product precision (default: the config's training.precision, fp32); "
                   "bf16 uses autocast on CPU and CUDA. A resumed run keeps its own.")
def train_cmd(splits, config, out, resume, features, device, stop_after, precision):
    """Train TERAN on SPLITS (train split; validation on val). Multi-GPU: run under torchrun."""
    from ..errors import PrepError
    from ..pipeline.train import train
    if config is None and not resume:
        raise PrepError("prep train: --config is required (a YAML path or teran_small, teran_coco, "
                        "teran_f30k) unless --resume continues an existing run")
    result = train(splits, config, out, resume=resume, features=features, device=device,
                   stop_after=stop_after, precision=precision, echo=click.echo)
    click.echo(result.summary())


@main.command("eval")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--splits", required=True, type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--protocol", type=click.Choice(["all", "1k", "5k"]), default="all", show_default=True,
              help="1k: mean over folds of 1000 images (COCO 1K); 5k: the first 5000 images.")
@click.option("--features", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Default: RUN/eval-SPLIT-PROTOCOL/.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: encode and score under bf16 autocast (default out: ...-bf16/).")
@click.option("--drift/--no-drift", default=None,
              help="With bf16: also score in fp32 and report the drift (default on for bf16).")
def eval_cmd(source, splits, split, protocol, features, out, device, batch_size, precision, drift):
    """Evaluate a run directory, a checkpoint, or an original TERAN model_best_rsum.pth.tar."""
    from ..pipeline.evaluate import evaluate
    evaluate(source, splits, split=split, protocol=protocol, features=features, out=out,
             device=device, batch_size=batch_size, precision=precision, drift=drift, echo=click.echo)


@main.command("show-alignment")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("image_key")
@click.argument("caption")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--splits", type=click.Path(path_type=Path),
              help="Splits whose features hold IMAGE_KEY (default: the run's training splits).")
@click.option("--features", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path),
              help="Image root (default: the features manifest's input root).")
@click.option("--tokenizer", help="Tokenizer dir or 'minilm' (default: the run's text encoder).")
def show_alignment_cmd(source, image_key, caption, out, splits, features, images, tokenizer):
    """Draw IMAGE_KEY with, for each word of CAPTION, the region it aligns to best."""
    from ..teran.visualize import show_alignment
    result = show_alignment(source, image_key, caption, out, splits=splits, features=features,
                            images=images, tokenizer=tokenizer)
    for word, region, score in result:
        click.echo(f"{word:>16s} -> region {region:3d}  ({score:+.3f})")
    click.echo(f"wrote {out}")

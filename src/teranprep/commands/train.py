"""CLI: train, eval and show-alignment (the bundled TERAN model)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main, quiet_option, stage_echo, storage_option, cache_options, say


@main.command("train")
@click.argument("splits", type=click.Path(path_type=Path))
@click.option("--config", "config",
              help="YAML file, or a bundled config name: teran_coco, teran_coco_vinvl, teran_f30k, teran_small "
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
@quiet_option
@storage_option
@cache_options
def train_cmd(splits, config, out, resume, features, device, stop_after, precision, quiet):
    """Train TERAN on SPLITS (train split; validation on val). Multi-GPU: run under torchrun."""
    from ..errors import PrepError
    from ..settings import bundled_configs, resolve_config
    if config is None and not resume:
        raise PrepError(f"prep train: --config is required (a YAML path or one of "
                        f"{bundled_configs('teran')}) unless --resume continues an existing run")
    if config is not None:
        resolve_config(config, "teran")  # a wrong --config is refused before torch is imported
    from ..pipeline.train import train
    result = train(splits, config, out, resume=resume, features=features, device=device,
                   stop_after=stop_after, precision=precision, echo=stage_echo(quiet))
    say(result.summary())


@main.command("eval")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--splits", required=True, type=click.Path(path_type=Path),
              help="splits/ folder holding the split to evaluate.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate: train, val or test.")
@click.option("--protocol", type=click.Choice(["all", "1k", "5k"]), default="all", show_default=True,
              help="1k: mean over folds of 1000 images (COCO 1K); 5k: the first 5000 images.")
@click.option("--features", type=click.Path(path_type=Path),
              help="Features directory (default: the one recorded in SPLITS/manifest.json).")
@click.option("--out", type=click.Path(path_type=Path), help="Default: RUN/eval-SPLIT-PROTOCOL/.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images (or captions) per encoder batch (>= 1).")
@click.option("--text-encoder", type=click.Path(path_type=Path),
              help="Original TERAN checkpoints: the text encoder's model directory (config.json), "
                   "when the one the checkpoint names is not on this machine.")
@click.option("--relevance", "relevance_files", multiple=True, type=click.Path(path_type=Path),
              help="An original precomputed relevance file {dataset}-{split}-{rougeL|spice}.npy "
                   "(headerless float32, captions x images); repeatable. SPICE comes in this way.")
@click.option("--relevance-cache", type=click.Path(path_type=Path),
              help="Folder of the cached ROUGE-L matrices (default: SPLITS-relevance/ beside SPLITS).")
@click.option("--no-ndcg", is_flag=True, help="Skip NDCG@25 (and the ROUGE-L relevance it needs).")
@click.option("--scheduler", help="tcp://HOST:PORT of a dask scheduler to compute ROUGE-L relevance on.")
@click.option("--workers", type=int,
              help="Local dask worker processes for ROUGE-L relevance (0: in this process)  "
                   "[default: 0; refused with --scheduler]")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout, nothing else.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: encode and score under bf16 autocast (default out: ...-bf16/).")
@click.option("--drift/--no-drift", default=None,
              help="With bf16: also score in fp32 and report the drift (default on for bf16).")
@quiet_option
@storage_option
@cache_options
def eval_cmd(source, splits, split, protocol, features, out, device, batch_size, text_encoder,
             relevance_files, relevance_cache, no_ndcg, scheduler, workers, as_json, precision, drift,
             quiet):
    """Evaluate a run directory, a checkpoint, or an original TERAN model_best_rsum.pth.tar."""
    import json
    from ..pipeline.evaluate import evaluate
    echo = (lambda message: click.echo(message, err=True)) if as_json else stage_echo(quiet)
    metrics = evaluate(source, splits, split=split, protocol=protocol, features=features, out=out,
                       device=device, batch_size=batch_size, text_encoder=text_encoder,
                       ndcg=not no_ndcg, relevance_files=relevance_files,
                       relevance_cache=relevance_cache, scheduler=scheduler, workers=workers,
                       precision=precision, drift=drift, echo=echo, quiet=quiet)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
    elif quiet:
        click.echo(f"{metrics['split']} ({metrics['protocol']}): rsum {metrics['rsum']:.1f}, "
                   f"i2t R@1 {metrics['i2t']['r1']:.1f}, t2i R@1 {metrics['t2i']['r1']:.1f}")


@main.command("show-alignment")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("image_key")
@click.argument("caption")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--splits", type=click.Path(path_type=Path),
              help="Splits whose features hold IMAGE_KEY (default: the run's training splits).")
@click.option("--features", type=click.Path(path_type=Path),
              help="Features directory holding IMAGE_KEY (overrides --splits' recorded one).")
@click.option("--images", type=click.Path(path_type=Path),
              help="Image root (default: the features manifest's input root).")
@click.option("--tokenizer", help="Tokenizer dir or 'minilm' (default: the run's text encoder).")
@click.option("--text-encoder", type=click.Path(path_type=Path),
              help="Original TERAN checkpoints: the text encoder's model directory (config.json).")
@storage_option
@cache_options
def show_alignment_cmd(source, image_key, caption, out, splits, features, images, tokenizer, text_encoder):
    """Draw IMAGE_KEY with, for each word of CAPTION, the region it aligns to best."""
    from ..pipeline.alignment import show_alignment
    result = show_alignment(source, image_key, caption, out, splits=splits, features=features,
                            images=images, tokenizer=tokenizer, text_encoder=text_encoder)
    for word, region, score in result:
        click.echo(f"{word:>16s} -> region {region:3d}  ({score:+.3f})")
    click.echo(f"wrote {out}")

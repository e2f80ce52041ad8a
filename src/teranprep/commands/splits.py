"""CLI: build-splits."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import main, storage_option, cache_options, say


@main.command("build-splits")
@click.argument("captions", type=click.Path(path_type=Path))
@click.option("--features", required=True, type=click.Path(path_type=Path),
              help="The features/ directory the splits are tied to (its manifest sha256 is recorded).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The splits/ directory to write.")
@click.option("--format", "format_", type=click.Choice(["auto", "karpathy", "csv", "jsonl", "features-index"]),
              default="auto", show_default=True, help="Caption file format (auto: suffix, then content).")
@click.option("--image-key-template",
              help="Map caption images to feature keys, e.g. '{filepath}/{filename}' or "
                   "'images/{filename}' (Karpathy), 'train2014/{image}' (CSV/JSONL).")
@click.option("--image-column", default="image", show_default=True, help="CSV/JSONL image column.")
@click.option("--caption-column", default="caption", show_default=True, help="CSV/JSONL caption column.")
@click.option("--restval", type=click.Choice(["train", "drop", "val"]), default="train",
              show_default=True, help="Where Karpathy restval images go.")
@click.option("--val", type=int, help="Seeded split: images in val (files without splits).")
@click.option("--test", type=int, help="Seeded split: images in test.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split by image.")
@click.option("--tokenizer", help="Fast tokenizer: a local model dir or a cached Hugging Face name "
                                  "(default: the bundled MiniLM's bert-base-uncased vocabulary).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=3),
              help="Truncate input_ids to this many tokens, [CLS] and [SEP] included (3 .. the "
                   "text encoder's positions: 512 for BERT and MiniLM; train refuses longer).")
@click.option("--caption-rule", type=click.Choice(["final-period", "as-given"]), default="final-period",
              show_default=True, help="final-period: a caption without a final '.' gets one, so the "
                                      "reference token-dropping rule scores its last word; search "
                                      "applies the same rule to queries.")
@click.option("--max-missing", default=0, show_default=True,
              help="Captions whose image has no ok features that are tolerated (listed in missing.csv).")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT even if it holds splits made with other parameters.")
@click.option("--quiet", is_flag=True, help="Print only errors, warnings and the final summary line.")
@storage_option
@cache_options
def build_splits_cmd(captions, features, out, format_, quiet, **options):
    """Tokenize CAPTIONS into train/val/test parquet files tied to FEATURES, written to OUT.

    CAPTIONS may be FEATURES/index.parquet itself when extract-regions read webdataset tars:
    each sample's .txt caption is in it (format features-index; pass --val/--test)."""
    from ..pipeline.splits import build_splits
    result = build_splits(captions, features=features, out=out, format=format_,
                          echo=None if quiet else click.echo, **options)
    if not quiet:
        say(result.summary())

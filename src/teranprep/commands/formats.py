"""CLI: import-features and export-features."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import cache_options, main, say, storage_option

_IMPORT = ("butd-tsv", "lxmert-tsv", "bua-npz", "teran", "scan-precomp", "vinvl-tsv")
_EXPORT = ("scan-precomp", "teran", "butd-tsv", "vinvl-tsv", "lmdb")


@main.command("import-features")
@click.argument("format_", metavar="FORMAT", type=click.Choice(_IMPORT))
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--key-map", type=click.Path(path_type=Path),
              help="CSV with header id,image_key: the image key of each source id (default: the id).")
@click.option("--shard-size", default=1000, show_default=True, help="Images per HDF5 shard.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True,
              help="dtype the features are stored in.")
@click.option("--sizes", type=click.Path(path_type=Path),
              help="teran: CSV id,width,height of the original images (default SRC/image_sizes.csv "
                   "when present, else -1 = unknown).")
@click.option("--split", "splits", multiple=True,
              help="scan-precomp: import only this split (repeatable; default every {split}_ims.npy).")
@click.option("--max-error-rate", default=1.0, show_default=True,
              help="Fail when more than this share of images are malformed (they are always "
                   "recorded as status=error rows and skipped).")
@click.option("--overwrite", is_flag=True, help="Delete previous outputs in OUT and start afresh.")
@click.option("--dry-run", is_flag=True, help="Print the shard plan (and why each shard would run); write nothing.")
@click.option("--quiet", is_flag=True, help="Print only errors, warnings and the final summary line.")
@storage_option
@cache_options
def import_features_cmd(format_, src, out, splits, **options):
    """Convert FORMAT features in SRC into a features/ directory OUT (HDF5 shards + index + manifest)."""
    from ..pipeline.formats import import_features
    result = import_features(format_, src, out, splits=tuple(splits), echo=click.echo, **options)
    if not options["dry_run"]:
        say(result.summary())


@main.command("export-features")
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Choice(_EXPORT), help="Output format.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--splits", type=click.Path(path_type=Path),
              help="scan-precomp: one {split}_* set per split of this splits/ dir, with captions "
                   "(val is written as SCAN's `dev`); default one `all` split without captions.")
@click.option("--key-map", type=click.Path(path_type=Path),
              help="CSV id,image_key: write each image under its id (default: the image key).")
@click.option("--label-map", type=click.Path(path_type=Path),
              help="vinvl-tsv: VinVL's VG-SGG-dicts-vgoi6-clipped.json, for class names in predictions.tsv.")
@click.option("--quiet", is_flag=True, help="Print only errors, warnings and the final summary line.")
@storage_option
@cache_options
def export_features_cmd(features, to, out, **options):
    """Write the features in FEATURES as files SCAN, TERAN, Caffe-TSV, Oscar/ALADIN (vinvl-tsv) or
    MMF (lmdb) readers load."""
    from ..pipeline.formats import export_features
    say(export_features(features, to, out, **options).summary())

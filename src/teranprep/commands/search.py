"""CLI: index, train-shortlist, search and serve."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli import main, quiet_option, stage_echo, storage_option, cache_options, say


@main.command("index")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--features", required=True, type=click.Path(path_type=Path), help="features/ to index.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="index/ directory to write.")
@click.option("--splits", type=click.Path(path_type=Path), help="Index only the images of these splits.")
@click.option("--split", help="With --splits (and --captions): only this split (train, val, test).")
@click.option("--captions", type=click.Path(path_type=Path),
              help="splits/ folder whose captions (--split, else all) are indexed for image->text search.")
@click.option("--head", type=click.Path(path_type=Path),
              help="Shortlist head dir (default RUN/shortlist when trained, else mean pooling).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="dtype the region embeddings are stored in.")
@click.option("--shard-size", default=1000, show_default=True, help="Images per HDF5 shard.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images (or captions) per encoder batch (>= 1).")
@click.option("--workers", type=int,
              help="0: in this process; N: a local dask cluster  [default: 0; refused with --scheduler]")
@click.option("--scheduler", help="tcp://host:port of a dask scheduler.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--threads", default=1, show_default=True, help="torch threads per task.")
@click.option("--exact-max", default=100_000, show_default=True,
              help="Up to this many images the shortlist is exact; above, FAISS IVF.")
@click.option("--overwrite", is_flag=True, help="Delete a previous index in --out and start afresh.")
@click.option("--dry-run", is_flag=True, help="Print the shard plan (and why each shard would run); write nothing.")
@quiet_option
@storage_option
@cache_options
def index_cmd(run, features, out, splits, split, captions, head, dtype, shard_size, batch_size,
              workers, scheduler, device, threads, exact_max, overwrite, dry_run, quiet):
    """Encode every ok image of FEATURES through RUN's image encoder into a searchable index."""
    from ..pipeline.index import build_index
    result = build_index(run, features, out, splits=splits, split=split, captions=captions, head=head,
                         dtype=dtype, shard_size=shard_size, batch_size=batch_size, workers=workers,
                         scheduler=scheduler, device=device, threads=threads, exact_max=exact_max,
                         overwrite=overwrite, dry_run=dry_run, echo=stage_echo(quiet), quiet=quiet)
    if not dry_run:
        say(result.summary())


@main.command("train-shortlist")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--splits", type=click.Path(path_type=Path), help="Default: the run's training splits.")
@click.option("--features", type=click.Path(path_type=Path),
              help="Features directory (default: the one recorded in the splits' manifest).")
@click.option("--out", type=click.Path(path_type=Path), help="Default: RUN/shortlist/.")
@click.option("--dim", default=256, show_default=True, help="Global vector size.")
@click.option("--epochs", default=30, show_default=True, help="Passes over the training images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images (or captions) per encoder batch (>= 1).")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate of the head.")
@click.option("--max-images", default=20000, show_default=True, help="Train on at most this many images.")
@click.option("--seed", default=0, show_default=True, help="Seed of the head's initialisation and batch order.")
@click.option("--overwrite", is_flag=True, help="Replace a previous head in --out.")
@quiet_option
@storage_option
@cache_options
def train_shortlist_cmd(run, splits, features, out, dim, epochs, batch_size, lr, max_images, seed,
                        overwrite, quiet):
    """Distil RUN's alignment scores into a small global-vector head (ALADIN's ListNet)."""
    from ..pipeline.shortlist import train_shortlist
    result = train_shortlist(run, splits=splits, features=features, out=out, dim=dim, epochs=epochs,
                             batch_size=batch_size, lr=lr, max_images=max_images, seed=seed,
                             overwrite=overwrite, echo=stage_echo(quiet))
    say(result.summary())


@main.command("search")
@click.argument("index", type=click.Path(path_type=Path))
@click.argument("query", required=False)
# The limits are pipeline/search.py's MAX_K and DEFAULT_SHORTLIST (not imported here: that
# module loads torch, and every `prep` command reads this file); a test keeps them equal.
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Results to return (1..1000).")
@click.option("--shortlist", type=click.IntRange(min=1),
              help="Re-rank the top N (>= 1; at most the indexed images are used) of the FAISS "
                   "shortlist; the default grows above 10,000 indexed images (x (n / 10k)^0.4, "
                   "500 from ~100k) to keep exhaustive search's top 10  [default: 200]")
@click.option("--exhaustive", is_flag=True, help="Score every image with the alignment (eval's path).")
@click.option("--image", "image_key", help="Image -> text: rank the indexed captions for this image key.")
@click.option("--tokenizer", help="Tokenizer dir or 'minilm' (default: the run's text encoder).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@storage_option
@cache_options
def search_cmd(index, query, k, shortlist, exhaustive, image_key, tokenizer, as_json):
    """Text -> image search for QUERY, or image -> text with --image KEY."""
    from ..errors import PrepError
    from ..pipeline.search import Searcher
    if (query is None) == (image_key is None):
        raise PrepError("prep search: give a QUERY, or --image KEY for image->text, not both")
    if image_key is not None and (shortlist is not None or exhaustive):
        raise PrepError("--shortlist/--exhaustive apply to text queries; --image is always exhaustive "
                        "over the caption set")
    with Searcher(index, tokenizer=tokenizer) as searcher:
        if searcher.warning:
            click.echo(f"WARNING: {searcher.warning}", err=True)
        if image_key is not None:
            ranked = searcher.search_captions(image_key, k)
            if as_json:
                click.echo(json.dumps({"image": image_key, "results": ranked}, indent=2))
            else:
                for r in ranked:
                    click.echo(f"{r['rank']:4d}  {r['score']:9.4f}  {r['image_key']}  {r['caption']}")
            return
        result = searcher.search(query, k=k, shortlist=shortlist, exhaustive=exhaustive)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.mode} search, {len(result.hits)} results"
               + (f" (shortlist {result.shortlist})" if result.shortlist else "")
               + f", {result.timings_ms['total']:.1f} ms")
    for hit in result.hits:
        click.echo(f"{hit.rank:4d}  {hit.score:9.4f}  {hit.key}")


@main.command("serve")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (localhost only by default).")
@click.option("--port", default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--images", type=click.Path(path_type=Path),
              help="Image root served to the page (default: the features' input root, if it exists).")
@click.option("--tokenizer", help="Tokenizer dir or 'minilm' (default: the run's text encoder).")
@storage_option
@cache_options
def serve_cmd(index, host, port, images, tokenizer):
    """A web page and JSON API over INDEX (FastAPI on uvicorn)."""
    from ..web.app import serve
    serve(index, host=host, port=port, images=images, tokenizer=tokenizer, echo=click.echo)

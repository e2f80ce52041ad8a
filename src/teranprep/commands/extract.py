"""CLI: extract-regions and verify."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli import ShownDefault, main, storage_option, say
from ..manifests.values import VERIFY_SAMPLE


def _default_model():
    from ..extractors import DEFAULT_MODEL
    return DEFAULT_MODEL


def _default_precision():
    from ..extractors import DEFAULT_PRECISION
    return DEFAULT_PRECISION


@main.command("extract-regions")
@click.argument("images")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default=_default_model, show_default=True, cls=ShownDefault,
              help="Detector name (see `prep weights list`).")
@click.option("--weights", type=click.Path(path_type=Path), help="Checkpoint file of the detector.")
@click.option("--random-weights", "random_weights", type=int, metavar="SEED",
              help="Deterministic random weights, for smoke tests: the features are MEANINGLESS.")
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1),
              help="Images per detector batch (>= 1).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--shard-size", default=1000, show_default=True, help="Images per HDF5 shard.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="dtype the features are stored in.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=_default_precision,
              show_default=True, cls=ShownDefault, help="Detector arithmetic: bf16 conv trunks (channels-last) with "
                                      "fp32 box selection; see docs/ARCHITECTURE.md.")
@click.option("--conf-thresh", default=0.2, show_default=True, help="Keep regions whose best class score is >= this.")
@click.option("--min-boxes", type=int, help="Default 10, or the named weights' policy (36 for -k36).")
@click.option("--max-boxes", type=int, help="Default 100, or the named weights' policy.")
@click.option("--given-boxes", type=click.Path(path_type=Path),
              help="JSON {image_key: [[x1,y1,x2,y2],...]} or parquet (image_key, boxes): features "
                   "for exactly these pixel boxes, no detection.")
@click.option("--box-source", type=click.Choice(["proposals", "regressed"]),
              help="BUTD only: save the proposal boxes (default, as the Caffe tool and MILVLG) or "
                   "the class-regressed boxes (py-bottom-up-attention).")
@click.option("--spatial", is_flag=True,
              help="VinVL only: append the 6 box-geometry values (x1/W, y1/H, x2/W, y2/H, w/W, h/H) "
                   "to each feature: the 2054-d layout of VinVL's released files.")
@click.option("--vinvl-selection", type=click.Choice(["per-class", "max-class"]),
              help="VinVL only: per-class (default: the yaml's NMS_FILTER 0, a box may repeat with "
                   "another class) or max-class (NMS_FILTER 1, one row per box, best first: the "
                   "setting of scene_graph_benchmark's README command for Oscar's features).")
@click.option("--missing-given-boxes", type=click.Choice(["error", "skipped"]), default="error",
              show_default=True, help="Status of an image the --given-boxes file has no entry for.")
@click.option("--backend", type=click.Choice(["native", "detectron2"]), default="native", show_default=True,
              help="detectron2: run detectron2's own model (needs detectron2 installed, --d2-config, --weights).")
@click.option("--d2-config", type=click.Path(path_type=Path), help="detectron2 config YAML (--backend detectron2).")
@click.option("--limit", type=int, help="Only the first N images (in key order).")
@click.option("--workers", type=int,
              help="Local dask worker processes (0 = run in this process, no dask)  [default: 1; "
                   "refused with --scheduler]")
@click.option("--scheduler", help="tcp://HOST:PORT of an existing dask.distributed scheduler (its "
                                  "workers run the shards; --device is checked on them).")
@click.option("--threads-per-worker", type=int,
              help="torch threads per task (default: cores / min(workers, shards); features are "
                   "byte-identical for any --workers at the same value).")
@click.option("--retries", default=2, show_default=True, help="Retries of a failed shard task.")
@click.option("--max-error-rate", default=0.01, show_default=True,
              help="Fail the stage (exit 2, manifest marked failed) above this share of error rows (0..1).")
@click.option("--max-megapixels", type=float,
              help="Images larger than this are error rows  [default: Pillow's limit, 89 megapixels]")
@click.option("--verify-inputs", is_flag=True,
              help="Re-hash the images of complete shards (sha256) and re-run the shards whose images "
                   "changed although their size and mtime did not (cp -p, rsync -t); reads every image.")
@click.option("--overwrite", is_flag=True, help="Delete previous outputs in OUT and start afresh.")
@click.option("--dry-run", is_flag=True, help="Print the shard plan and exit.")
@click.option("--quiet", is_flag=True, help="Print only errors, warnings and the final summary line.")
@storage_option
def extract_regions_cmd(images, out, weights, random_weights, quiet, given_boxes, box_source, backend,
                        d2_config, spatial, vinvl_selection, **options):
    """Detect regions in IMAGES and write HDF5 shards + index + manifest to OUT.

    IMAGES is a folder (searched recursively), webdataset/img2dataset tar shards
    ('images/{00000..00099}.tar', a glob or one .tar; captions and metadata go into the index),
    or a .parquet/.csv list with a `path` column (and optionally `key`)."""
    from ..errors import PrepError
    from ..pipeline.extract import ExtractOptions, extract_regions
    model_options = {} if box_source in (None, "proposals") else {"box_source": box_source}
    if spatial or vinvl_selection is not None:
        from ..extractors.registry import WEIGHTS
        from ..pipeline.extract import VINVL_MODELS
        name = options["model"]
        if (WEIGHTS[name].architecture if name in WEIGHTS else name) not in VINVL_MODELS or backend != "native":
            flag = "--spatial" if spatial else "--vinvl-selection"
            raise PrepError(f"{flag} applies to the VinVL models ({', '.join(VINVL_MODELS)}) only; "
                            f"leave it out for --model {name}")
        if spatial:
            model_options["spatial"] = True
        if vinvl_selection not in (None, "per-class"):
            model_options["selection"] = vinvl_selection
    if box_source is not None and backend == "detectron2":
        raise PrepError("--box-source applies to the native BUTD models only; detectron2 saves "
                        "its own (regressed) boxes: leave --box-source out")
    if box_source is not None:
        from ..extractors.registry import WEIGHTS
        from ..pipeline.extract import BUTD_MODELS
        name = options["model"]
        if (WEIGHTS[name].architecture if name in WEIGHTS else name) not in BUTD_MODELS:
            raise PrepError(f"--box-source applies to the BUTD models ({', '.join(BUTD_MODELS)}) "
                            f"only; --model {name} saves its own boxes: leave --box-source out")
    if d2_config is not None and backend != "detectron2":
        raise PrepError("--d2-config applies to --backend detectron2 only; add --backend "
                        "detectron2 or leave --d2-config out")
    if options["missing_given_boxes"] != "error" and given_boxes is None:
        raise PrepError("--missing-given-boxes applies with --given-boxes only; leave it out")
    if backend == "detectron2":
        if d2_config is None:
            raise PrepError("--backend detectron2 needs --d2-config CONFIG.yaml (and --weights)")
        from ..extractors.detectron2_backend import config_sha256
        options["model"] = "detectron2"
        model_options["d2_config"] = str(Path(d2_config).resolve())
        # in the parameters fingerprint: an edited config (or _BASE_) is not a resumable run
        model_options["d2_config_sha256"] = config_sha256(d2_config)
    if given_boxes is not None:
        from ..pipeline.regions import read_given_boxes
        given_boxes = read_given_boxes(given_boxes)
    settings = ExtractOptions(weights=str(weights) if weights else None, random_weights=random_weights,
                              quiet=quiet, given_boxes=given_boxes, model_options=model_options or None,
                              **options)
    result = extract_regions(images, out, settings, echo=click.echo,
                             warn=lambda line: click.echo(line, err=True))
    if not options["dry_run"]:
        say(result.summary())


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--full", is_flag=True, help="Check the values (finite, boxes inside the image) of "
              f"every image, not a sample of {VERIFY_SAMPLE}.")
@click.option("--quiet", is_flag=True, help="Print only the problems and the final line, no warnings.")
@storage_option
def verify_cmd(path, full, quiet):
    """Check an output directory: features/ (hashes, offsets, index), splits/ (lineage, schema,
    disjoint splits) or runs/NAME (checkpoints load, config and lineage match)."""
    from ..manifests.remote import url_of
    from ..pipeline.verify import verify
    path = url_of(path) or path  # click's Path type folds s3:// into s3:/
    report = verify(path, full=full)
    for line in ([] if quiet else report.warnings):
        click.echo(f"warning: {line}", err=True)
    for line in report.problems:
        click.echo(f"problem: {line}", err=True)
    if not report.ok:
        click.echo(f"verify: {len(report.problems)} problem(s) in {path}", err=True)
        sys.exit(1)
    click.echo(f"verify: {path} is consistent ({len(report.checked)} files checked)")

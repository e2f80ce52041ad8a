"""extract-regions: image folder -> features/ (HDF5 shards + index.parquet + manifest.json).

The plan is a pure function of the sorted listing and --shard-size, so every run (and every
worker count) cuts the same shards. Each shard task decodes, detects and writes its own file
atomically, then its stats file (shards/regions-NNNNN.json); the stats file is the completion
marker and carries the shard's index rows. The driver assembles index and manifest last.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ItemError, PrepError
from ..extractors import (DEFAULT_MODEL, DEFAULT_PRECISION, MODELS, PRECISIONS, DetectorSpec, build_detector,
                          resolve_device, resolve_model)
from ..manifests import atomic_write_json, fingerprint, sha256_file
from ..manifests.features import (INDEX_NAME, OPTIONAL_INDEX_COLUMNS, SHARDS_DIR, completed_shard,
                                  current_manifest, prepare_output, write_index_and_manifest)
from ..manifests.shards import Regions, ShardWriter, remove_stale_temps, shard_name
from .distribute import default_threads, report_progress, run_tasks, tune_malloc_for_tensors
from .results import FeaturesResult
from .images import ImageEntry, listing_sha256
from .inputs import discover_inputs, read_entries

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: these features are meaningless; use them only to "
                          "test the pipeline, never to train or evaluate a model")


@dataclass(frozen=True)
class ShardTask:
    index: int
    root: str
    out: str
    entries: tuple  # ImageEntry, sorted
    spec: DetectorSpec
    dtype: str
    batch_size: int
    params_fingerprint: str
    threads: int
    given_boxes: tuple = ()  # (key, (k,4) list) pairs for this shard's images, given-box mode

    def __repr__(self):
        return f"shard {self.index:05d} ({len(self.entries)} images)"

    @property
    def h5_path(self) -> Path:
        return Path(self.out) / SHARDS_DIR / shard_name(self.index)

    @property
    def stats_path(self) -> Path:
        return self.h5_path.with_suffix(".json")


@dataclass
class ExtractResult(FeaturesResult):

    def summary(self) -> str:
        rate = self.manifest.get("timings", {}).get("images_per_s")
        speed = f" at {rate:.2f} images/s" if rate else ""
        again = ("nothing to do: every shard was already complete" if self.shards_run == 0
                 else f"ran {self.shards_run} of {self.n_shards} shards{speed}")
        return (f"extract-regions: {self.n_images} images -> {self.out}: {self.n_ok} ok, "
                f"{self.n_error} errors, {self.n_shards} shards; {again} in {self.wall_s:.1f} s. "
                f"Detector {self.manifest.get('detector', {}).get('name')} "
                f"(weights {str(self.manifest.get('detector', {}).get('weights_sha256'))[:19]}), "
                f"precision {self.manifest.get('parameters', {}).get('precision', 'fp32')}, "
                f"features {self.manifest.get('parameters', {}).get('dtype')}. "
                f"Check with `prep verify {self.out}`.")


# ---------------------------------------------------------------- worker side

def run_shard(task: ShardTask) -> dict:
    """Extracts one shard and writes it; returns (and writes) its stats. Runs inside a worker."""
    import torch
    tune_malloc_for_tensors()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        return _run_shard(task)
    finally:  # in-process runs (--workers 0) must not leave the caller's torch changed
        torch.set_num_threads(threads_before)


def _run_shard(task: ShardTask) -> dict:
    t0 = time.perf_counter()
    detector = build_detector(task.spec)
    t_build = time.perf_counter() - t0
    given = dict(task.given_boxes)
    rows = []
    timings = {"build_s": t_build, "decode_s": 0.0, "detect_s": 0.0, "write_s": 0.0}
    task.h5_path.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(task.h5_path, feature_dim=detector.feature_dim, dtype=task.dtype,
                         optional_columns=detector.columns,
                         attrs={"detector": task.spec.model, "weights_sha256": detector.weights_sha256,
                                "params_fingerprint": task.params_fingerprint})
    stream = read_entries(task.root, task.entries)  # read + decoded ahead, in a thread
    try:
        for start in range(0, len(task.entries), task.batch_size):
            batch = task.entries[start:start + task.batch_size]
            t = time.perf_counter()
            decoded = []
            for entry in batch:
                row = _base_row(entry)
                _, got = next(stream)
                if isinstance(got, ItemError):
                    row.update(status="error", error=str(got))
                else:
                    image, data = got
                    row.update(file_sha256=hashlib.sha256(data).hexdigest(),
                               height=image.shape[0], width=image.shape[1])
                    decoded.append((entry, image, row))
                rows.append(row)
            t1 = time.perf_counter()
            detections = _detect_isolating_failures(detector, decoded, given)
            t2 = time.perf_counter()
            for (entry, image, row), det in zip(decoded, detections):
                if isinstance(det, str):
                    row.update(status="error", error=det)
                    continue
                problem = ShardWriter.check_representable(det.features, task.dtype)
                if problem:
                    row.update(status="error", error=f"{entry.key}: {problem}")
                    continue
                regions = Regions(entry.key, image.shape[1], image.shape[0], det.boxes,
                                  det.features, **{c: getattr(det, c) for c in detector.columns})
                row.update(status="ok", error="", shard=f"{SHARDS_DIR}/{task.h5_path.name}",
                           row=writer.append(regions), num_boxes=len(regions))
            t3 = time.perf_counter()
            timings["decode_s"] += t1 - t
            timings["detect_s"] += t2 - t1
            timings["write_s"] += t3 - t2
            report_progress({"run": task.out, "shard": task.index, "done": len(rows),
                             "errors": sum(r["status"] == "error" for r in rows)})
        t = time.perf_counter()
        writer.close()
        timings["write_s"] += time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    finally:
        stream.close()
    timings["total_s"] = time.perf_counter() - t0
    stats = {
        "shard": f"{SHARDS_DIR}/{task.h5_path.name}",
        "n_images": writer.n_images, "n_boxes": writer.n_boxes,
        "bytes": task.h5_path.stat().st_size, "sha256": sha256_file(task.h5_path),
        "params_fingerprint": task.params_fingerprint, "device": str(getattr(detector, "device", "")),
        "threads": task.threads,
        "detector": {"name": detector.name, "weights_sha256": detector.weights_sha256,
                     "feature_dim": detector.feature_dim, "columns": list(detector.columns)},
        "timings": timings, "rows": rows,
    }
    atomic_write_json(task.stats_path, stats)
    return stats


def _base_row(entry: ImageEntry) -> dict:
    return {"image_key": entry.key, "status": "error", "error": "", "shard": "", "row": -1,
            "width": -1, "height": -1, "num_boxes": 0, "file_size": entry.size,
            "file_mtime_ns": entry.mtime_ns, "file_sha256": "",
            **{k: v for k, v in entry.extra if k in OPTIONAL_INDEX_COLUMNS}}


def _detect_isolating_failures(detector, decoded, given):
    """Detections for a batch; if the batch fails, each image alone, so one bad image costs one row."""
    if not decoded:
        return []
    images = [image for _, image, _ in decoded]
    boxes = [np.asarray(given[e.key], np.float32).reshape(-1, 4) for e, _, _ in decoded] if given else None
    try:
        return detector.detect(images, boxes)
    except Exception:  # noqa: BLE001 - isolated below
        if len(decoded) == 1:
            raise
    out = []
    for i, image in enumerate(images):
        try:
            out.append(detector.detect([image], None if boxes is None else [boxes[i]])[0])
        except Exception as exc:  # noqa: BLE001 - a per-image failure is recorded, not fatal
            out.append(f"detector failed: {type(exc).__name__}: {exc}")
    return out


# ---------------------------------------------------------------- driver side

def shard_is_complete(task: ShardTask) -> dict | None:
    """The shard's stats when it was completed for exactly these inputs and parameters."""
    planned = [(e.key, e.size, e.mtime_ns) for e in task.entries]
    return completed_shard(task.h5_path, task.params_fingerprint, lambda stats: planned == [
        (r["image_key"], r["file_size"], r["file_mtime_ns"]) for r in stats.get("rows", [])])


def _validate(batch_size, shard_size, dtype, workers, retries, max_error_rate,
              min_boxes, max_boxes, conf_thresh, model, weights, random_weights, limit, precision):
    checks = [(precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
              (precision == "fp32" or model != "detectron2",
               "--precision bf16 is not available with --backend detectron2; use --precision fp32"),
              (batch_size >= 1, "--batch-size must be >= 1"),
              (shard_size >= 1, "--shard-size must be >= 1"),
              (dtype in ("float16", "float32"), "--dtype must be float16 or float32"),
              (workers >= 0, "--workers must be >= 0"), (retries >= 0, "--retries must be >= 0"),
              (0 <= max_error_rate <= 1, "--max-error-rate must be within [0, 1]"),
              (1 <= min_boxes <= max_boxes, "need 1 <= --min-boxes <= --max-boxes"),
              (0 <= conf_thresh <= 1, "--conf-thresh must be within [0, 1]"),
              (limit is None or limit >= 1, "--limit must be >= 1"),
              (model in MODELS, f"unknown --model {model!r}; choose one of: {', '.join(sorted(MODELS))}"),
              ((weights is None) != (random_weights is None),
               "pass exactly one of --weights PATH and --random-weights SEED")]
    for ok, message in checks:
        if not ok:
            raise PrepError(message)
    if weights is not None and not Path(weights).is_file():
        raise PrepError(f"{weights}: weights file not found; pass the checkpoint path to --weights")


def extract_regions(images: Path, out: Path, *, model: str = DEFAULT_MODEL,
                    weights: str | None = None, random_weights: int | None = None,
                    batch_size: int = 2, device: str = "auto", shard_size: int = 1000,
                    dtype: str = "float16", conf_thresh: float = 0.2, min_boxes: int | None = None,
                    max_boxes: int | None = None, limit: int | None = None, workers: int = 1,
                    scheduler: str | None = None, threads_per_worker: int | None = None,
                    retries: int = 2, max_error_rate: float = 0.01, overwrite: bool = False,
                    dry_run: bool = False, quiet: bool = False, given_boxes: dict | None = None,
                    precision: str = DEFAULT_PRECISION,
                    model_options: dict | None = None, echo=print) -> ExtractResult:
    """Detects regions in every image under `images` and writes features/ to `out`.

    Resumable: complete shards are kept, a finished stage is a no-op. Raises PrepError on a fatal
    problem (bad option, changed parameters without overwrite, error rate above the limit).
    """
    t_start = time.perf_counter()
    out = Path(out)
    # registry names (butd-vg-r101-k36) -> architecture + cached weights + their box policy
    model, weights, min_boxes, max_boxes = resolve_model(model, weights, random_weights, min_boxes, max_boxes)
    _validate(batch_size, shard_size, dtype, workers, retries, max_error_rate, min_boxes,
              max_boxes, conf_thresh, model, weights, random_weights, limit, precision)
    inputs = discover_inputs(images, limit)  # a folder, tar shards or a list file
    entries = inputs.entries
    if not entries:
        raise PrepError(f"{images}: no images found (looked for "
                        "jpg, jpeg, png, bmp, webp, tif; case-insensitive, recursive)")
    weights_sha = sha256_file(Path(weights)) if weights else f"random-seed-{random_weights}"
    spec = DetectorSpec(model=model, weights=str(Path(weights).resolve()) if weights else None,
                        random_seed=random_weights, device=device, conf_thresh=conf_thresh,
                        min_boxes=min_boxes, max_boxes=max_boxes, precision=precision,
                        options=tuple(sorted((model_options or {}).items())))
    params = {"model": model, "weights_sha256": weights_sha, "dtype": dtype,
              "shard_size": shard_size, "batch_size": batch_size, "conf_thresh": conf_thresh,
              "min_boxes": min_boxes, "max_boxes": max_boxes, "options": dict(spec.options),
              "given_boxes_sha256": _given_boxes_digest(given_boxes), "precision": precision}
    params_fp = fingerprint(params)
    prepare_output(out, params_fp, overwrite and not dry_run)
    # torch's CPU kernels round differently with different thread counts: the count per task is
    # fixed before any task runs (default_threads: cores / tasks that can run at once), so
    # features are byte-identical for any worker count under the same thread setting.
    n_shards = -(-len(entries) // shard_size)
    threads = threads_per_worker or default_threads(workers, n_shards, scheduler)
    tasks = [ShardTask(index=i, root=inputs.root, out=str(out.resolve()),
                       entries=tuple(entries[s:s + shard_size]), spec=spec, dtype=dtype,
                       batch_size=batch_size, params_fingerprint=params_fp, threads=threads,
                       given_boxes=_boxes_for(entries[s:s + shard_size], given_boxes))
             for i, s in enumerate(range(0, len(entries), shard_size))]
    done = {t.index: stats for t in tasks if (stats := shard_is_complete(t)) is not None}
    pending = [t for t in tasks if t.index not in done]
    if dry_run:
        echo(f"dry run: {len(entries)} images -> {len(tasks)} shards of up to {shard_size} "
             f"images in {out / SHARDS_DIR}; {len(done)} complete, {len(pending)} to run")
        for t in tasks:
            state = "complete" if t.index in done else "pending"
            echo(f"  {t.h5_path.name}  {len(t.entries):6d} images  {t.entries[0].key} .. "
                 f"{t.entries[-1].key}  [{state}]")
        return ExtractResult(out, len(entries), 0, 0, len(tasks), 0, time.perf_counter() - t_start)
    if random_weights is not None and not quiet:
        echo(f"WARNING: {RANDOM_WEIGHTS_WARNING}")
    if precision == "fp32" and not quiet and pending and model != "detectron2" \
            and resolve_device(device) == "cpu":
        from ..extractors.precision import bf16_speedup_hint
        echo(bf16_speedup_hint(threads))
    listing = listing_sha256(entries)
    if not pending:
        existing = current_manifest(out, params_fp, listing)
        if existing is not None:
            return _result(out, existing, 0, time.perf_counter() - t_start)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / SHARDS_DIR)
    remove_stale_temps(out)

    from .progress import ExtractProgress
    total_images = sum(len(t.entries) for t in pending)
    bar = ExtractProgress(total_images, quiet=quiet)
    t_run = time.perf_counter()
    try:
        results = run_tasks(run_shard, pending, workers=workers, scheduler=scheduler,
                            retries=retries, on_result=bar.shard_done,
                            on_progress=lambda p: p.get("run") == str(out.resolve()) and bar.shard_progress(p))
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    for task, stats in zip(pending, results):
        done[task.index] = stats
    manifest = _write_outputs(out, inputs, tasks, done, params, params_fp, listing, run_s,
                              total_images, random_weights is not None, device)
    result = _result(out, manifest, len(pending), time.perf_counter() - t_start)
    n = result.n_images
    if n and result.n_error / n > max_error_rate:
        raise PrepError(f"{out / INDEX_NAME}: {result.n_error} of {n} images failed "
                        f"({100 * result.n_error / n:.1f}% > --max-error-rate "
                        f"{100 * max_error_rate:g}%); the errors are listed there (status=error); "
                        "completed shards are kept")
    return result


def _given_boxes_digest(given_boxes):
    if not given_boxes:
        return None
    digest = hashlib.sha256()
    for key in sorted(given_boxes):
        digest.update(key.encode())
        digest.update(np.asarray(given_boxes[key], np.float32).tobytes())
    return digest.hexdigest()


def _boxes_for(entries, given_boxes):
    if not given_boxes:
        return ()
    return tuple((e.key, np.asarray(given_boxes.get(e.key, np.zeros((0, 4))), np.float32).tolist())
                 for e in entries)


def _write_outputs(out, inputs, tasks, done, params, params_fp, listing, run_s, images_run,
                   random_weights, device):
    stats = [done[t.index] for t in tasks]
    detector = stats[0]["detector"]
    compute = {k: round(sum(s["timings"].get(k, 0.0) for s in stats), 3)
               for k in ("build_s", "decode_s", "detect_s", "write_s", "total_s")}
    extra = {"warning": RANDOM_WEIGHTS_WARNING} if random_weights else {}
    extra["devices"] = {"requested": device, "used": sorted({s.get("device", "") for s in stats}),
                        "threads_per_task": sorted({s.get("threads", 0) for s in stats})}
    return write_index_and_manifest(
        out, stage="extract-regions", rows=[row for s in stats for row in s["rows"]],
        shard_stats=stats, parameters=params, parameters_fingerprint=params_fp,
        detector={"name": detector["name"], "weights_sha256": detector["weights_sha256"],
                  "columns": detector["columns"], "random_weights": random_weights},
        feature_dim=detector["feature_dim"], dtype=params["dtype"],
        input_info={**inputs.info(), "listing_sha256": listing},
        timings={"last_run_wall_s": round(run_s, 3), "images_last_run": images_run,
                 "images_per_s": round(images_run / run_s, 3) if run_s > 0 else None,
                 "shard_compute_s": compute},
        extra=extra)


def _result(out, manifest, shards_run, wall_s):
    return ExtractResult.from_manifest(out, manifest, shards_run, wall_s)

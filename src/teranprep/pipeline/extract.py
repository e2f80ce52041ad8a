"""extract-regions: image folder -> features/ (HDF5 shards + index.parquet + manifest.json).

A thin definition on pipeline/common/sharded.py (the plan, markers, resume, dry run): an item
is an image entry, whose signature is its (size, mtime); a shard task decodes, detects and
writes its own file atomically and returns its stats (with the shard's index rows), which the
engine writes as the completion marker. The driver assembles index and manifest last.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import ItemError, PrepError
from ..devices import device_kind
from ..extractors import (DEFAULT_MODEL, DEFAULT_PRECISION, MODELS, PRECISIONS, DetectorSpec, build_detector,
                          resolve_model)
from ..manifests import fingerprint, sha256_file
from ..manifests import remote
from ..manifests.atomic import atomic_write_bytes
from ..manifests.error_summary import format_error_summary, summarize_errors
from ..manifests.outcome import mark_outcome
from ..manifests.ownership import FEATURES, claim_output_dir
from ..manifests.features import (INDEX_NAME, MANIFEST_NAME, OPTIONAL_INDEX_COLUMNS, SHARDS_DIR,
                                  prepare_output,
                                  write_index_and_manifest)
from ..manifests.shards import Regions, ShardWriter
from .common.distribute import (check_workers, default_threads, report_progress, stage_device,
                                 tune_malloc_for_tensors)
from .common.sharded import PlannedItem, ShardedStage, ShardTask
from .common.results import FeaturesResult
from .common.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageEntry, listing_sha256
from .common.inputs import discover_inputs, entry_digests, read_entries
from ..manifests.ownership import releases_locks

NO_GIVEN_BOXES = "no given boxes: the --given-boxes file has no entry for this image"
UNMATCHED_GIVEN_BOXES = "given_boxes_unmatched.txt"  # box-file keys that match no image
BUTD_MODELS = ("butd-r101", "butd-tiny")
VINVL_MODELS = ("vinvl-x152c4", "vinvl-tiny")
RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: these features are meaningless; use them only to "
                          "test the pipeline, never to train or evaluate a model")


@dataclass(frozen=True)
class ExtractTask(ShardTask):
    root: str = ""
    entries: tuple = ()  # ImageEntry, sorted
    spec: DetectorSpec | None = None
    dtype: str = "float16"
    batch_size: int = 2
    threads: int = 1
    given_boxes: tuple = ()  # (key, (k,4) list) pairs for this shard's images, given-box mode
    given_mode: bool = False
    missing_given_boxes: str = "error"  # status of an image the given-box file has no entry for
    max_pixels: int = MAX_IMAGE_PIXELS  # larger images are error rows (--max-megapixels)
    weights_sha256: str = ""  # weights at a URL: what the worker's own copy must hash to

    def __repr__(self):
        return f"shard {self.index:05d} ({len(self.entries)} images)"

    def compute(self) -> dict:
        return run_shard(self)


@dataclass
class ExtractResult(FeaturesResult):

    def summary(self) -> str:
        m = self.manifest
        rate = m.get("timings", {}).get("images_per_s")
        speed = f" at {rate:.2f} images/s" if rate else ""
        again = ("nothing to do: every shard was already complete" if self.shards_run == 0
                 else f"ran {self.shards_run} of {self.n_shards} shards{speed}")
        lines = [f"extract-regions: {self.n_images} images -> {self.out}: {self.n_ok} ok, "
                 f"{self.n_error} errors, {self.n_shards} shards; {again} in {self.wall_s:.1f} s. "
                 f"Detector {m.get('detector', {}).get('name')} "
                 f"(weights {str(m.get('detector', {}).get('weights_sha256'))[:19]}), "
                 f"precision {m.get('parameters', {}).get('precision', 'fp32')}, "
                 f"features {m.get('parameters', {}).get('dtype')}. "
                 f"Check with `prep verify {self.out}`."]
        if m.get("errors_by_reason"):
            lines.append(f"  errors by reason: {format_error_summary(m['errors_by_reason'])}")
        passed = m.get("input", {}).get("passed_over") or {}
        if passed:
            lines.append("  passed over (not listed): " + ", ".join(
                f"{v['count']} {reason} (e.g. {', '.join(v['examples'][:3])})" for reason, v in passed.items()))
        given = m.get("given_boxes") or {}
        if given.get("unmatched_keys"):
            lines.append(f"  --given-boxes: {given['unmatched_keys']} keys match no image, listed in "
                         f"{self.out}/{given['unmatched_list']}")
        return "\n".join(lines)


# ---------------------------------------------------------------- worker side

def run_shard(task: ExtractTask) -> dict:
    """Extracts one shard and writes it; returns its stats (the engine writes them as the marker)."""
    import torch
    tune_malloc_for_tensors()
    task = _with_local_weights(task)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        return _run_shard(task)
    finally:  # in-process runs (--workers 0) must not leave the caller's torch changed
        torch.set_num_threads(threads_before)


_weights_checked: dict = {}  # (local path, size, mtime) -> sha256, per worker process


def _with_local_weights(task: ExtractTask) -> ExtractTask:
    """Weights at a URL: this worker's copy (its own cache, fetched once), whose sha256 must be
    the one the driver planned with; the task's spec then names that local file."""
    from dataclasses import replace
    url = remote.url_of(task.spec.weights) if task.spec is not None and task.spec.weights else None
    if url is None:
        return task
    local = remote.fetch_input(url, "weights file")
    st = local.stat()
    key = (str(local), st.st_size, st.st_mtime_ns)
    if key not in _weights_checked:
        _weights_checked[key] = sha256_file(local)
    if _weights_checked[key] != task.weights_sha256:
        raise PrepError(f"{url}: sha256 {_weights_checked[key][:12]}.. on this worker, the run was "
                        f"planned with {task.weights_sha256[:12]}..; the object changed during the run: "
                        "re-run the command")
    return replace(task, spec=replace(task.spec, weights=str(local)))


def _run_shard(task: ExtractTask) -> dict:
    t0 = time.perf_counter()
    detector = build_detector(task.spec)
    t_build = time.perf_counter() - t0
    given = dict(task.given_boxes)
    given_mode = task.given_mode
    # BUTD drops proposals narrower than rpn_min_size original pixels: below that nothing is found.
    min_side = float(getattr(getattr(detector, "cfg", None), "rpn_min_size", 1) or 1)
    rows = []
    timings = {"build_s": t_build, "decode_s": 0.0, "detect_s": 0.0, "write_s": 0.0}
    task.h5_path.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(task.h5_path, feature_dim=detector.feature_dim, dtype=task.dtype,
                         optional_columns=detector.columns,
                         attrs={"detector": task.spec.model, "weights_sha256": detector.weights_sha256,
                                "params_fingerprint": task.params_fingerprint})
    # read + decoded ahead, in a thread
    stream = read_entries(task.root, task.entries, max_pixels=task.max_pixels)
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
                    if given_mode and entry.key not in given:
                        row.update(status=task.missing_given_boxes, error=NO_GIVEN_BOXES)
                    elif not given_mode and min(image.shape[:2]) < min_side:
                        row.update(error=f"image too small for the detector: {image.shape[1]}x"
                                         f"{image.shape[0]} px, needs at least {min_side:g} px "
                                         "on each side")
                    else:
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
        "threads": _threads_now(), "cpu_capability": _cpu_capability(), "cpu": _cpu_description(),
        "detector": {"name": detector.name, "weights_sha256": detector.weights_sha256,
                     "feature_dim": detector.feature_dim, "columns": list(detector.columns)},
        "timings": timings, "rows": rows,
    }
    return stats


def _threads_now() -> int:
    import torch
    return int(torch.get_num_threads())  # what this worker runs at, as the manifest records it


def _cpu_description() -> str:
    from ..extractors.precision import cpu_description
    return cpu_description()  # this worker's CPU model and bf16 hardware (AMX / AVX512-BF16 / none)


def _cpu_capability() -> str:
    import torch
    return str(torch.backends.cpu.get_cpu_capability())  # this worker's kernels, not the driver's


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
    except Exception as exc:  # noqa: BLE001 - isolated below
        if len(decoded) == 1:  # alone already: this image is the one the detector rejects
            return [f"detector failed: {type(exc).__name__}: {_first_line(exc)}"]
    out = []
    for i, image in enumerate(images):
        try:
            out.append(detector.detect([image], None if boxes is None else [boxes[i]])[0])
        except Exception as exc:  # noqa: BLE001 - a per-image failure is recorded, not fatal
            out.append(f"detector failed: {type(exc).__name__}: {_first_line(exc)}")
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


# ---------------------------------------------------------------- driver side

def content_changed(task: ExtractTask, stats: dict) -> int:
    """--verify-inputs: how many images of a complete shard now hash differently from the sha256
    its marker recorded (a rewrite that kept size and mtime: `cp -p`, `rsync -t`). Rows without a
    recorded sha256 (images that failed to decode) are compared by size and mtime only."""
    recorded = {r["image_key"]: r.get("file_sha256") or None for r in stats.get("rows", [])}
    return sum(1 for entry, digest in entry_digests(task.root, task.entries)
               if recorded.get(entry.key) is not None and digest != recorded[entry.key])


def recorded_items(stats: dict) -> list:
    """[(key, signature)] a marker was computed for: each row's key, (file size, mtime)."""
    return [[r["image_key"], [r["file_size"], r["file_mtime_ns"]]] for r in stats.get("rows", [])]


def _validate(batch_size, shard_size, dtype, workers, retries, max_error_rate,
              min_boxes, max_boxes, conf_thresh, model, weights, random_weights, limit, precision):
    checks = [(precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
              (precision == "fp32" or model != "detectron2",
               "--precision bf16 is not available with --backend detectron2; use --precision fp32"),
              (batch_size >= 1, "--batch-size must be >= 1"),
              (shard_size >= 1, "--shard-size must be >= 1"),
              (dtype in ("float16", "float32"), "--dtype must be float16 or float32"),
              (retries >= 0, "--retries must be >= 0"),
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


@dataclass(frozen=True)
class ExtractOptions:
    """Every setting of one extract-regions run, typed: the command builds it from its options,
    extract_regions runs it, and the manifest records it (`options`, given boxes by digest)."""
    model: str = DEFAULT_MODEL
    weights: str | None = None
    random_weights: int | None = None
    batch_size: int = 2
    device: str = "auto"
    shard_size: int = 1000
    dtype: str = "float16"
    conf_thresh: float = 0.2
    min_boxes: int | None = None
    max_boxes: int | None = None
    limit: int | None = None
    workers: int | None = None  # None: 1 local worker; refused with a scheduler
    scheduler: str | None = None
    threads_per_worker: int | None = None
    retries: int = 2
    max_error_rate: float = 0.01
    overwrite: bool = False
    dry_run: bool = False
    quiet: bool = False
    given_boxes: dict | None = field(default=None, compare=False, repr=False)  # key -> (k, 4) boxes
    missing_given_boxes: str = "error"
    precision: str = DEFAULT_PRECISION
    model_options: dict | None = None
    max_megapixels: float | None = None  # None: Pillow's limit (89.5 megapixels)
    verify_inputs: bool = False  # re-hash the images of complete shards; re-run those that changed

    def recorded(self) -> dict:
        """What the manifest keeps: every field, the given boxes as their sha256."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "given_boxes"}
        out["given_boxes_sha256"] = _given_boxes_digest(self.given_boxes)
        return out


@releases_locks
def extract_regions(images: Path, out: Path, options: ExtractOptions | None = None, *, echo=print,
                    warn=None, **settings) -> ExtractResult:
    """Detects regions in every image under `images` and writes features/ to `out`.

    `options` is an ExtractOptions; or pass its fields as keywords (extract_regions(images, out,
    shard_size=2)), not both. Resumable: complete shards are kept, a finished stage is a no-op;
    images added later go into new shards (shards/plan.json keeps each shard's membership).
    Raises PrepError on a fatal problem (bad option, changed parameters without overwrite, error
    rate above the limit, which a re-run reports again until the inputs or the limit change).
    """
    if options is not None and settings:
        raise TypeError("extract_regions: pass an ExtractOptions or keyword settings, not both")
    options = options if options is not None else ExtractOptions(**settings)
    targets: list = []  # an OUT at a URL: its RemoteFolder, whose lock object goes at the end
    try:
        return _extract_regions(remote.url_of(images) or Path(images), remote.url_of(out) or Path(out),
                                options, echo, warn, targets)
    finally:
        for target in targets:
            target.unlock()


def _extract_regions(images, out, opts: ExtractOptions, echo, warn, targets) -> ExtractResult:
    model = opts.model
    weights = opts.weights
    random_weights = opts.random_weights
    batch_size = opts.batch_size
    device = opts.device
    shard_size = opts.shard_size
    dtype = opts.dtype
    conf_thresh = opts.conf_thresh
    min_boxes = opts.min_boxes
    max_boxes = opts.max_boxes
    limit = opts.limit
    workers = opts.workers
    scheduler = opts.scheduler
    threads_per_worker = opts.threads_per_worker
    retries = opts.retries
    max_error_rate = opts.max_error_rate
    overwrite = opts.overwrite
    dry_run = opts.dry_run
    quiet = opts.quiet
    given_boxes = opts.given_boxes
    missing_given_boxes = opts.missing_given_boxes
    precision = opts.precision
    model_options = opts.model_options
    if opts.max_megapixels is not None and not opts.max_megapixels > 0:
        raise PrepError("--max-megapixels must be > 0")
    max_pixels = MAX_IMAGE_PIXELS if opts.max_megapixels is None else int(opts.max_megapixels * 1e6)
    t_start = time.perf_counter()
    warn = warn or echo
    out_url = remote.url_of(out)
    out = Path(out) if out_url is None else out
    # registry names (butd-vg-r101-k36) -> architecture + cached weights + their box policy
    model, weights, min_boxes, max_boxes = resolve_model(model, weights, random_weights, min_boxes, max_boxes)
    weights_url = remote.url_of(weights) if weights is not None else None
    if weights_url is not None:  # fetched here once for its sha256; each worker fetches it too, checked
        weights = str(remote.fetch_input(weights_url, "weights file"))
    workers = check_workers(workers, scheduler, default=1)
    _validate(batch_size, shard_size, dtype, workers, retries, max_error_rate, min_boxes,
              max_boxes, conf_thresh, model, weights, random_weights, limit, precision)
    options = dict(model_options or {})
    if "box_source" in options and model not in BUTD_MODELS:
        raise PrepError(f"--box-source applies to the BUTD models ({', '.join(BUTD_MODELS)}) only; "
                        f"--model {model} saves its own boxes: leave --box-source out")
    if missing_given_boxes not in ("error", "skipped"):
        raise PrepError("--missing-given-boxes must be error or skipped")
    # before any input is read: this machine's CUDA, or what the scheduler's workers report
    run_device = stage_device(device, scheduler)
    target = None
    if out_url is not None:  # a folder at a URL: worked on through a local mirror of its small files
        target = remote.RemoteFolder(out_url)
        targets.append(target)  # unlocked and its mirror removed at the end, however it ends
        out = target.pull()
        if not dry_run:
            target.lock()
            if overwrite:
                target.clear()
    claim_output_dir(out, FEATURES, create=not dry_run)
    inputs = discover_inputs(images, limit)  # a folder, tar shards or a list file
    entries, passed_over = inputs.entries, inputs.passed_over
    if not entries:
        extra = f"; passed over: {passed_over.summary()}" if passed_over.total() else ""
        raise PrepError(f"{images}: no images found (looked for "
                        f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}; case-insensitive, "
                        f"recursive){extra}")
    weights_sha = sha256_file(Path(weights)) if weights else f"random-seed-{random_weights}"
    resolved_device = device_kind(run_device)
    spec = DetectorSpec(model=model, weights=weights_url or (str(Path(weights).resolve()) if weights else None),
                        random_seed=random_weights, device=run_device, conf_thresh=conf_thresh,
                        min_boxes=min_boxes, max_boxes=max_boxes, precision=precision,
                        options=tuple(sorted(options.items())))
    # torch's CPU kernels round differently with different thread counts: the count per task is
    # fixed before any task runs (default_threads: cores / tasks that can run at once), so
    # features are byte-identical for any worker count under the same thread setting.
    n_shards = -(-len(entries) // shard_size)
    threads = threads_per_worker or default_threads(workers, n_shards, scheduler)
    params = {"model": model, "weights_sha256": weights_sha, "dtype": dtype,
              "shard_size": shard_size, "batch_size": batch_size, "conf_thresh": conf_thresh,
              "min_boxes": min_boxes, "max_boxes": max_boxes, "options": dict(spec.options),
              "given_boxes_sha256": _given_boxes_digest(given_boxes),
              "missing_given_boxes": missing_given_boxes if given_boxes is not None else None,
              "threads_per_task": threads, "device": resolved_device, "precision": precision}
    if model in BUTD_MODELS:
        from ..extractors.butd.detector import INFERENCE
        params["inference"] = INFERENCE
    elif model in VINVL_MODELS:
        from ..extractors.vinvl.detector import INFERENCE, feature_layout
        params["inference"] = INFERENCE
        params["feature_layout"] = feature_layout(bool(options.get("spatial")))
    if opts.max_megapixels is not None:  # which images are errors; absent (Pillow's) in older folders
        params["max_pixels"] = max_pixels
    params_fp = fingerprint(params)
    prepare_output(out, params_fp, overwrite and not dry_run)
    unmatched = sorted(set(given_boxes) - {e.key for e in entries}) if given_boxes else []
    items = [PlannedItem(e.key, [e.size, e.mtime_ns], e) for e in entries]

    def make_task(index, members):
        part = [m.payload for m in members]
        return ExtractTask(index=index, out=str(out.resolve()), params_fingerprint=params_fp,
                           remote=out_url or "", storage=remote.storage_options_text(),
                           weights_sha256=weights_sha if weights_url else "",
                           root=inputs.root, entries=tuple(part), spec=spec, dtype=dtype,
                           batch_size=batch_size, threads=threads,
                           given_boxes=_boxes_for(part, given_boxes), given_mode=given_boxes is not None,
                           missing_given_boxes=missing_given_boxes, max_pixels=max_pixels)

    stage = ShardedStage("extract-regions", out, items, shard_size, params_fp, make_task,
                         recorded_items, listing=listing_sha256(entries),
                         recheck=content_changed if opts.verify_inputs else None, remote=target)
    if dry_run:
        for line in stage.report_lines():
            echo(line)
        if passed_over.total():
            echo(f"  passed over: {passed_over.summary()}")
        return ExtractResult(out, len(entries), 0, 0, len(stage.tasks), 0, time.perf_counter() - t_start)
    if random_weights is not None:
        warn(f"WARNING: {RANDOM_WEIGHTS_WARNING}")  # never hidden by --quiet
    if precision == "fp32" and not quiet and stage.pending and model == "butd-r101" \
            and resolved_device == "cpu":  # the full-size model only: the one where it matters
        from ..extractors.precision import bf16_speedup_hint
        hint = bf16_speedup_hint(threads)
        if hint:
            echo(hint)
    if precision == "bf16" and stage.pending and resolved_device == "cpu" and model in ("butd-r101", "vinvl-x152c4"):
        from ..extractors.precision import bf16_slowdown_warning
        slow = bf16_slowdown_warning(threads)
        if slow:
            warn(slow)
    manifest = stage.current_manifest()
    shards_run = 0
    if manifest is None:
        manifest, shards_run = _run_pending(stage, inputs, params, opts, workers, scheduler, retries, quiet,
                                            random_weights is not None, device, passed_over, unmatched,
                                            out_url)
    result = _result(out_url or out, manifest, shards_run, time.perf_counter() - t_start)
    n = result.n_images
    failure = None
    if n and result.n_error / n > max_error_rate:
        # Checked on every run, so a failed stage stays failed until its inputs or limit change.
        failure = (f"{result.n_error} of {n} images failed ({100 * result.n_error / n:.1f}% > "
                   f"--max-error-rate {100 * max_error_rate:g}%)")
    mark_outcome(out / MANIFEST_NAME, failure)  # downstream stages refuse a failed folder
    if target is not None:  # the index, then the manifest: last, as on disk
        for name in (INDEX_NAME, UNMATCHED_GIVEN_BOXES, MANIFEST_NAME):
            target.push(name)
    if failure:
        raise PrepError(f"{remote.location(out)}/{INDEX_NAME}: {failure}: "
                        f"{format_error_summary(manifest.get('errors_by_reason', {})) or 'no reasons recorded'}; "
                        "completed shards are kept; fix or remove those images, or raise --max-error-rate")
    return result


def _run_pending(stage, inputs, params, opts, workers, scheduler, retries, quiet, random_weights, device,
                 passed_over, unmatched, out_url=None):
    from .common.progress import ExtractProgress
    out = stage.out
    total_images = sum(len(t.entries) for t in stage.pending)
    bar = ExtractProgress(total_images, quiet=quiet, label="extract-regions")
    t_run = time.perf_counter()
    try:
        stage.run(workers=workers, scheduler=scheduler, retries=retries, on_result=bar.shard_done,
                  on_progress=lambda p: p.get("run") == str(out.resolve()) and bar.shard_progress(p))
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    if unmatched:
        atomic_write_bytes(out / UNMATCHED_GIVEN_BOXES, "".join(f"{k}\n" for k in unmatched).encode())
    else:
        (out / UNMATCHED_GIVEN_BOXES).unlink(missing_ok=True)
    manifest = _write_outputs(out, inputs, stage.ordered_stats(), params, opts, stage.params_fingerprint,
                              stage.listing, run_s, total_images, random_weights, device, passed_over,
                              unmatched, out_url)
    return manifest, len(stage.pending)


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
    return tuple((e.key, np.asarray(given_boxes[e.key], np.float32).tolist())
                 for e in entries if e.key in given_boxes)


def _write_outputs(out, inputs, stats, params, options, params_fp, listing, run_s, images_run,
                   random_weights, device, passed_over, unmatched, out_url=None):
    rows = [row for s in stats for row in s["rows"]]
    detector = stats[0]["detector"]
    compute = {k: round(sum(s["timings"].get(k, 0.0) for s in stats), 3)
               for k in ("build_s", "decode_s", "detect_s", "write_s", "total_s")}
    extra = {"warning": RANDOM_WEIGHTS_WARNING} if random_weights else {}
    extra["options"] = options.recorded()  # as the command built them (not fingerprinted)
    extra["devices"] = {"requested": device, "used": sorted({s.get("device", "") for s in stats}),
                        "threads_per_task": sorted({s.get("threads", 0) for s in stats}),
                        "cpus": sorted({s["cpu"] for s in stats if s.get("cpu")})}
    failed = [r for r in rows if r["status"] == "error"]
    extra["errors_by_reason"] = summarize_errors([r["image_key"] for r in failed], [r["error"] for r in failed])
    if out_url:  # where the folder lives, and how it was reached (secrets left out)
        extra["storage"] = {"url": out_url, "storage_options": remote.redacted()}
    if params.get("given_boxes_sha256"):
        extra["given_boxes"] = {"unmatched_keys": len(unmatched),
                                "unmatched_list": UNMATCHED_GIVEN_BOXES if unmatched else None}
    return write_index_and_manifest(
        out, stage="extract-regions", rows=rows,
        shard_stats=stats, parameters=params, parameters_fingerprint=params_fp,
        detector={"name": detector["name"], "weights_sha256": detector["weights_sha256"],
                  "columns": detector["columns"], "random_weights": random_weights},
        feature_dim=detector["feature_dim"], dtype=params["dtype"],
        input_info={**inputs.info(), "listing_sha256": listing,
                    "passed_over": passed_over.as_dict()},
        timings={"last_run_wall_s": round(run_s, 3), "images_last_run": images_run,
                 "images_per_s": round(images_run / run_s, 3) if run_s > 0 else None,
                 "shard_compute_s": compute},
        extra=extra)


def _result(out, manifest, shards_run, wall_s):
    return ExtractResult.from_manifest(out, manifest, shards_run, wall_s)

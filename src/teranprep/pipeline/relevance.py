"""The relevance cache: a split's ROUGE-L matrix computed once (in row blocks, resumable, on dask
when asked) and the NDCG@25 of an eval's rankings over it or over the original's files."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PrepError
from ..manifests.atomic import atomic_write_json, commit_temp, sha256_file, temp_path_for
from ..manifests.relevance import (block_name, default_relevance_dir, matrix_path, measure_of_file,
                                   open_matrix, parts_dir, read_relevance_manifest,
                                   write_relevance_manifest, PLAN_NAME)
from ..manifests.splits import split_path
from ..teran.relevance import ROUGE_BETA, TokenizedCaptions, fold_ndcg, rouge_l_rows
from ..manifests.ownership import releases_locks

BLOCK_ROWS = 1000
REPORT_ROWS = 25  # a block reports its progress every this many captions (and at its end)
TOKENIZATION = 'text.lower().split(" ")'


def split_captions(path: Path):
    """(raw captions in file order, caption -> image index, image keys in first-appearance order)."""
    import pandas as pd
    frame = pd.read_parquet(path, columns=["image_key", "raw"])
    keys = list(dict.fromkeys(frame["image_key"]))
    position = {k: i for i, k in enumerate(keys)}
    return frame["raw"].tolist(), frame["image_key"].map(position).to_numpy(np.int64), keys


@dataclass(frozen=True)
class RougeBlock:
    """Rows [start, stop) of one split's ROUGE-L matrix, written to `out` (a task for run_tasks)."""
    split_file: str
    split_sha256: str
    start: int
    stop: int
    out: str
    run: str = ""  # the blocks' folder: what the driver's progress accepts events of


_tokenized: dict = {}  # one split per worker process: (path, sha256) -> TokenizedCaptions


def compute_rouge_block(task: RougeBlock) -> dict:
    key = (task.split_file, task.split_sha256)
    if key not in _tokenized:
        if sha256_file(Path(task.split_file)) != task.split_sha256:
            raise PrepError(f"{task.split_file}: changed while its relevance was being computed; "
                            "run eval again")
        captions, caption_image, keys = split_captions(Path(task.split_file))
        _tokenized.clear()
        _tokenized[key] = TokenizedCaptions(captions, caption_image, len(keys))
    t0 = time.perf_counter()
    from .common.distribute import report_progress
    n = task.stop - task.start

    def done(rows: int) -> None:
        if rows % REPORT_ROWS == 0 or rows == n:
            report_progress({"run": task.run, "shard": task.start, "done": rows, "errors": 0})
    rows = rouge_l_rows(_tokenized[key], range(task.start, task.stop), done=done)
    out = Path(task.out)
    tmp = temp_path_for(out)
    with open(tmp, "wb") as fh:
        np.save(fh, rows)
    commit_temp(tmp, out)
    return {"start": task.start, "stop": task.stop, "seconds": time.perf_counter() - t0}


def _check_cache_dir(cache_dir: Path, splits_dir: Path) -> None:
    """Its own folder: never splits/ (build-splits') nor inside any stage's data folder."""
    from ..manifests.ownership import RELEVANCE, claim_output_dir
    claim_output_dir(cache_dir, RELEVANCE, create=False)


@releases_locks
def ensure_rouge_matrix(splits_dir: Path, split: str, *, cache_dir: Path | None = None,
                        scheduler: str | None = None, workers: int = 0,
                        block_rows: int = BLOCK_ROWS, echo=print, quiet: bool = False) -> Path:
    """The split's ROUGE-L matrix file, computed into the cache unless it is already there.
    Progress: a bar on a terminal, else a line every $TERANPREP_PROGRESS_SECONDS; none if quiet."""
    splits_dir = Path(splits_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_relevance_dir(splits_dir)
    _check_cache_dir(cache_dir, splits_dir)
    splits_manifest = splits_dir / "manifest.json"
    source = split_path(splits_dir, split)
    if not splits_manifest.is_file() or not source.is_file():
        raise PrepError(f"{source}: split {split!r} not found; build-splits writes it")
    lineage = {"path": str(splits_dir.resolve()), "manifest_sha256": sha256_file(splits_manifest)}
    manifest = read_relevance_manifest(cache_dir)
    if manifest is not None and manifest["splits"]["manifest_sha256"] != lineage["manifest_sha256"]:
        raise PrepError(f"{cache_dir}: relevance of other splits ({manifest['splits']['path']}, "
                        f"manifest sha256 {manifest['splits']['manifest_sha256'][:12]}..); delete it "
                        "or pass --relevance-cache another folder")
    name = f"{split}-rougeL"
    target = matrix_path(cache_dir, split, "rougeL")
    entry = (manifest or {}).get("matrices", {}).get(name)
    split_sha = sha256_file(source)
    if (entry and entry["split_sha256"] == split_sha and target.is_file()
            and target.stat().st_size == entry["bytes"]):
        return target

    captions, caption_image, keys = split_captions(source)
    n_captions, n_images = len(captions), len(keys)
    plan = {"split": split, "split_sha256": split_sha, "n_captions": n_captions,
            "n_images": n_images, "block_rows": block_rows, "measure": "rougeL",
            "beta": ROUGE_BETA, "tokenization": TOKENIZATION,
            "splits_manifest_sha256": lineage["manifest_sha256"]}
    parts = parts_dir(cache_dir, split, "rougeL")
    plan_path = parts / PLAN_NAME
    if plan_path.is_file() and _read_json(plan_path) != plan:
        shutil.rmtree(parts)  # blocks of another split version or blocking: never mixed in
    parts.mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        atomic_write_json(plan_path, plan)
    blocks = [(s, min(s + block_rows, n_captions)) for s in range(0, n_captions, block_rows)]
    run = str(parts.resolve())
    todo = [RougeBlock(str(source.resolve()), split_sha, s, e, str((parts / block_name(s, e)).resolve()), run)
            for s, e in blocks if not (parts / block_name(s, e)).is_file()]
    t0 = time.perf_counter()
    if todo:
        echo(f"relevance: ROUGE-L of {n_captions} captions x {n_images} images of {source}, "
             f"{len(todo)} of {len(blocks)} row blocks to compute -> {cache_dir}")
        from ..interrupts import resumable
        from .common.progress import ExtractProgress
        done = lambda: sum((parts / block_name(s, e)).is_file() for s, e in blocks)  # noqa: E731
        bar = ExtractProgress(sum(t.stop - t.start for t in todo), quiet=quiet, unit="captions",
                              label="relevance", counts=False)
        try:
            with resumable(lambda: f"{done()} of {len(blocks)} ROUGE-L row blocks complete in {parts}"):
                run_tasks_for_relevance(todo, scheduler=scheduler, workers=workers,
                                        on_progress=lambda p: p.get("run") == run and bar.shard_progress(p))
        finally:
            bar.close()
    tmp = temp_path_for(target)
    with open(tmp, "wb") as fh:
        for s, e in blocks:
            rows = np.load(parts / block_name(s, e), mmap_mode="r")
            if rows.shape != (e - s, n_images) or rows.dtype != np.float32:
                raise PrepError(f"{parts / block_name(s, e)}: shape {rows.shape}, expected "
                                f"({e - s}, {n_images}); delete {parts} and run again")
            fh.write(np.ascontiguousarray(rows).tobytes())
    commit_temp(tmp, target)
    matrices = dict((manifest or {}).get("matrices", {}))
    matrices[name] = {"file": target.name, "split": split, "measure": "rougeL",
                      "shape": [n_captions, n_images], "bytes": target.stat().st_size,
                      "sha256": sha256_file(target), "split_sha256": split_sha,
                      "beta": ROUGE_BETA, "tokenization": TOKENIZATION,
                      "seconds": round(time.perf_counter() - t0, 3)}
    write_relevance_manifest(cache_dir, {"stage": "relevance", "splits": lineage, "matrices": matrices})
    shutil.rmtree(parts)
    return target


def run_tasks_for_relevance(tasks, *, scheduler, workers, on_progress=None):
    from .common.distribute import run_tasks
    return run_tasks(compute_rouge_block, tasks, workers=workers, scheduler=scheduler,
                     on_progress=on_progress)


def _read_json(path: Path):
    import json
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _is_range(index: np.ndarray) -> bool:
    return len(index) > 0 and int(index[-1]) - int(index[0]) == len(index) - 1 and bool(np.all(np.diff(index) == 1))


class NdcgScorer:
    """NDCG@25 of the rankings of an eval, for each relevance measure it has a matrix of."""

    def __init__(self, matrices: dict[str, np.ndarray], rows: np.ndarray, sources: dict):
        self.matrices, self.rows, self.sources = matrices, rows, sources

    def fold(self, images: np.ndarray, caps: np.ndarray, scores: np.ndarray) -> dict:
        """{"i2t": {ndcg_M: ...}, "t2i": {...}} for one scored block (images x caps)."""
        out = {"i2t": {}, "t2i": {}}
        rows = self.rows[caps]
        for measure, matrix in self.matrices.items():
            if _is_range(rows) and _is_range(images):
                # the whole split (protocols all / 5k): a view of the file, read chunk by chunk
                # by fold_ndcg, instead of two copies of a captions x images matrix (1 GB at 5K)
                relevance = matrix[rows[0]:rows[-1] + 1, images[0]:images[-1] + 1]
            else:
                relevance = np.asarray(matrix[rows][:, images], dtype=np.float32)
            result = fold_ndcg(relevance, scores)
            for direction in out:
                out[direction][f"ndcg_{measure}"] = result[direction]
        return out


def ndcg_scorer(splits_dir: Path, split: str, data, *, relevance_files=(), cache_dir=None,
                scheduler=None, workers=0, echo=print, quiet: bool = False) -> NdcgScorer:
    """The scorer for `data` (the split as eval loaded it, maybe cut to its first images): ROUGE-L
    from the cache (computed when missing) unless a --relevance file gives it, plus those files."""
    source = split_path(splits_dir, split)
    captions, caption_image, keys = split_captions(source)
    n_images = len(data.image_keys)
    if keys[:n_images] != list(data.image_keys):
        raise PrepError(f"{source}: its images are not the ones eval loaded; run eval again")
    rows = np.flatnonzero(caption_image < n_images)
    if len(rows) != len(data.caption_image):
        raise PrepError(f"{source}: {len(rows)} captions of the first {n_images} images, eval "
                        f"loaded {len(data.caption_image)}; run eval again")
    files: dict[str, Path] = {}
    for path in relevance_files:
        measure = measure_of_file(path)
        if measure in files:
            raise PrepError(f"{path}: a second --relevance file for {measure} ({files[measure]})")
        files[measure] = Path(path)
    if "rougeL" in files and (cache_dir is not None or scheduler or workers):
        raise PrepError(f"{files['rougeL']} gives ROUGE-L, so nothing is computed: drop "
                        "--relevance-cache, --scheduler and --workers")
    matrices, sources = {}, {}
    for measure, path in files.items():
        matrices[measure] = open_matrix(path, len(captions), len(keys))
        sources[measure] = {"file": str(path), "given": True}
    if "rougeL" not in files:
        path = ensure_rouge_matrix(splits_dir, split, cache_dir=cache_dir, scheduler=scheduler,
                                   workers=workers, echo=echo, quiet=quiet)
        matrices["rougeL"] = open_matrix(path, len(captions), len(keys))
        sources["rougeL"] = {"file": str(path), "given": False}
    return NdcgScorer(matrices, rows, sources)

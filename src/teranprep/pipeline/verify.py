"""verify: re-read an output directory and name every problem with the file it is in."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifests import remote, sha256_file
from ..manifests.features import FEATURES_FORMAT, INDEX_COLUMNS, INDEX_NAME, MANIFEST_NAME, SHARDS_DIR
from ..manifests.claims import shard_claim_problems
from ..manifests.shards import ShardReader
from ..manifests.splits import SPLITS_FORMAT


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    full: bool = False  # check the values of every image, not a sample (--full)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, path, message):
        self.problems.append(f"{path}: {message}")


RUN_CONFIG = "config.yaml"
# How an index row identifies its input file (DESIGN.md: "file_size, file_sha256 (or
# mtime+size)"): file_size always, then a content hash or a modification time, either one.
# Extract writes all three; a store written by another tool may carry only the hash.
FILE_IDENTITY_COLUMNS = ("file_size", "file_sha256", "file_mtime_ns")


def verify(path: Path, *, full: bool = False) -> VerifyReport:
    """Checks features/ or splits/ (by their manifest's format, see VERIFIERS), a training run
    (runs/NAME: config.yaml + checkpoints) or a runs/ folder of them. The values of region
    shards (finite, boxes inside their image) are checked on a sample of images, or on every
    image with `full`. A URL (s3://...) is checked the same way on a temporary copy of its
    objects, and each shard object's size and ETag against the manifest."""
    if remote.url_of(path):
        return verify_remote(remote.url_of(path), full=full)
    path = Path(path)
    report = VerifyReport(path, full=full)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file() and path.is_dir():
        runs = [path] if (path / RUN_CONFIG).is_file() else sorted(
            d for d in path.iterdir() if d.is_dir() and (d / RUN_CONFIG).is_file())
        if runs:
            for run in runs:
                verify_run(run, report)
            return report
    if not manifest_path.is_file():
        report.problem(manifest_path, "missing: the stage never finished here (re-run it)")
        return report
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except ValueError as exc:
        report.problem(manifest_path, f"not valid JSON ({exc})")
        return report
    fmt = manifest.get("format")
    checker = VERIFIERS.get(fmt)
    if checker is None:
        report.problem(manifest_path, f"unknown format {fmt!r}")
        return report
    if manifest.get("status") == "failed":
        report.problem(manifest_path, f"the {manifest.get('stage', 'stage')} run that wrote it failed "
                                      f"({manifest.get('failure', 'no reason recorded')}); later "
                                      "stages refuse it until a re-run passes")
    checker(path, manifest, report)
    return report


def verify_remote(url: str, *, full: bool = False) -> VerifyReport:
    """A folder at a URL: every object (but the writer's lock) fetched into a temporary folder and
    verified as on disk (sizes, sha256, structure, index), problems named by their URL; then the
    listed size and ETag of each shard object against the manifest's record."""
    import tempfile
    url = url.rstrip("/")
    report = VerifyReport(url, full=full)
    objects = remote.listing(url)
    if MANIFEST_NAME not in objects and RUN_CONFIG not in objects:  # a run: config + checkpoints
        report.problem(remote.join(url, MANIFEST_NAME), "missing: the stage never finished here (re-run it)")
        return report
    with tempfile.TemporaryDirectory(prefix="prep-verify-") as tmp:
        for rel in sorted(objects):
            if rel != remote.LOCK_NAME:
                try:
                    remote.get_file(remote.join(url, rel), Path(tmp) / rel)
                except FileNotFoundError:  # removed while we listed: verify reports it missing
                    continue
        inner = verify(Path(tmp), full=full)
        try:
            manifest = json.loads((Path(tmp) / MANIFEST_NAME).read_text("utf-8"))
        except (OSError, ValueError):
            manifest = {}
    relabel = lambda text: text.replace(str(Path(tmp)), url)  # noqa: E731
    report.problems = [relabel(p) for p in inner.problems]
    report.warnings = [relabel(w) for w in inner.warnings]
    report.checked = list(inner.checked)
    for entry in manifest.get("shards", []) if isinstance(manifest, dict) else []:
        stored = objects.get(entry.get("path", ""))
        if stored is None:
            continue  # reported missing above
        if entry.get("etag") and stored["etag"] and stored["etag"] != entry["etag"]:
            report.problem(remote.join(url, entry["path"]), f"object ETag {stored['etag']} differs from "
                           f"the manifest's {entry['etag']} (replaced after the run)")
    return report


def verify_features(root: Path, manifest: dict, report: VerifyReport) -> None:
    from ..manifests.values import VERIFY_SAMPLE, sample_positions
    listed_keys: dict[str, tuple[str, int]] = {}
    entries = manifest.get("shards", [])
    # Value checks: every image with --full, else VERIFY_SAMPLE images spread over all shards.
    starts = np.cumsum([0] + [int(e.get("n_images", 0)) for e in entries])
    sampled = sample_positions(int(starts[-1]), None if report.full else VERIFY_SAMPLE)
    bad_values: list[str] = []
    for number, entry in enumerate(entries):
        shard_path = root / entry["path"]
        if not shard_path.is_file():
            report.problem(shard_path, "listed in the manifest but missing")
            continue
        size = shard_path.stat().st_size
        if size != entry["bytes"]:
            change = "truncated?" if size < entry["bytes"] else "grown: written to after the run?"
            report.problem(shard_path, f"size {size} bytes, manifest says {entry['bytes']} ({change})")
        digest = sha256_file(shard_path)
        if digest != entry["sha256"]:
            report.problem(shard_path, f"sha256 {digest[:12]}.. differs from the manifest's "
                                       f"{entry['sha256'][:12]}.. (damaged or replaced)")
        try:
            reader = ShardReader(shard_path)
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            report.problem(shard_path, f"cannot be opened as a regions shard ({exc})")
            continue
        with reader:
            _check_shard_structure(reader, entry, report)
            for claim in shard_claim_problems(reader, manifest):
                report.problem(shard_path, claim)
            rows = sampled[(sampled >= starts[number]) & (sampled < starts[number + 1])] - starts[number]
            bad_values += _check_values(reader, rows)
            for row, key in enumerate(reader.image_keys):
                if key in listed_keys:
                    report.problem(shard_path, f"image {key!r} also stored in {listed_keys[key][0]}")
                listed_keys[key] = (entry["path"], row)
        report.checked.append(entry["path"])
    if bad_values:
        scope = "every image" if report.full else f"a sample of {len(sampled)} images (--full: all)"
        report.problem(root, f"{len(bad_values)} images hold unusable values ({scope} checked): "
                             + "; ".join(bad_values[:5]))
    _check_index(root, manifest, listed_keys, report)
    _check_image_hashes(root, manifest, report)
    _report_error_rows(root, report)
    shard_dir = root / SHARDS_DIR
    if shard_dir.is_dir():
        listed = {Path(e["path"]).name for e in manifest.get("shards", [])}
        for extra in sorted(shard_dir.glob("*.h5")):
            if extra.name not in listed:
                report.warnings.append(f"{extra}: not listed in the manifest (ignored by readers)")


def _check_image_hashes(root: Path, manifest: dict, report: VerifyReport) -> None:
    """The recorded sha256 of a sample of input images (all with --full) against the files, for
    a folder input: an image rewritten in place with its size and mtime kept is reported."""
    from ..manifests.values import VERIFY_SAMPLE, sample_positions
    source = manifest.get("input") or {}
    if source.get("kind") != "folder" or not source.get("root") or remote.is_url(source["root"]):
        return  # tar members, list files and images at a URL are not re-read here
    try:
        index = pd.read_parquet(root / INDEX_NAME, columns=["image_key", "status", "file_sha256"])
    except Exception:  # noqa: BLE001 - _check_index already reported an unreadable index
        return
    hashed = index[(index["status"] == "ok") & (index["file_sha256"].fillna("") != "")]
    picked = sample_positions(len(hashed), None if report.full else VERIFY_SAMPLE)
    images = Path(source["root"])
    changed, absent = [], []
    for key, recorded in zip(hashed["image_key"].to_numpy()[picked], hashed["file_sha256"].to_numpy()[picked]):
        path = images / key
        if not path.is_file():
            absent.append(key)
        elif sha256_file(path) != recorded:
            changed.append(key)
    scope = "every image" if report.full else f"{len(picked)} sampled images (--full: all)"
    if changed:
        report.problem(images, f"{len(changed)} of {scope} changed since extraction (sha256 differs "
                               f"from {INDEX_NAME}), e.g. {', '.join(map(repr, changed[:5]))}; their "
                               "features are stale: re-run extract-regions with --overwrite")
    if absent:
        report.warnings.append(f"{images}: {len(absent)} of {scope} are no longer there (features "
                               f"kept), e.g. {', '.join(map(repr, absent[:5]))}")


def _check_values(reader: ShardReader, rows) -> list[str]:
    """The value problems (NaN/inf, inverted or out-of-image boxes) of the shard's `rows`."""
    from ..manifests.values import region_value_problem
    found = []
    n = len(reader.image_keys)
    for row in rows:
        if not 0 <= row < n:
            continue  # the structure check reported the count mismatch
        try:
            regions = reader.read(int(row))
        except Exception as exc:  # noqa: BLE001 - an unreadable row is the finding
            found.append(f"{reader.path.name} row {row}: unreadable ({type(exc).__name__})")
            continue
        problem = region_value_problem(regions, source=reader.path.name)
        if problem:
            found.append(f"{regions.image_key!r}: {problem}")
    return found


def _report_error_rows(root: Path, report: VerifyReport) -> None:
    """Error rows are recorded outcomes, not damage: one warning line counting them by reason."""
    from ..manifests.error_summary import format_error_summary, summarize_errors
    try:
        index = pd.read_parquet(root / INDEX_NAME, columns=["image_key", "status", "error"])
    except Exception:  # noqa: BLE001 - _check_index already reported an unreadable index
        return
    errors = index[index["status"] == "error"]
    if len(errors):
        summary = summarize_errors(errors["image_key"].tolist(), errors["error"].tolist())
        report.warnings.append(f"{root / INDEX_NAME}: {len(errors)} of {len(index)} images are "
                               f"error rows (recorded, no features): {format_error_summary(summary)}")


def _check_shard_structure(reader: ShardReader, entry: dict, report: VerifyReport) -> None:
    path = reader.path
    offsets = reader.offsets
    n = len(reader.image_keys)
    n_rows = reader.dataset("features").shape[0]
    if n != entry["n_images"]:
        report.problem(path, f"{n} images, manifest says {entry['n_images']}")
    if len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        report.problem(path, "offsets are not a non-decreasing sequence from 0 with one entry per image + 1")
    elif offsets[-1] != n_rows:
        report.problem(path, f"offsets end at {offsets[-1]} but features has {n_rows} rows")
    if n_rows != entry["n_boxes"]:
        report.problem(path, f"{n_rows} feature rows, manifest says {entry['n_boxes']} boxes")
    for name in ["boxes", *reader.columns]:
        if reader.dataset(name).shape[0] != n_rows:
            report.problem(path, f"dataset {name} has {reader.dataset(name).shape[0]} rows, "
                                 f"features has {n_rows}")
    if reader.image_size.shape != (n, 2):
        report.problem(path, f"image_size shape {reader.image_size.shape}, expected ({n}, 2)")
    if reader.image_keys != sorted(set(reader.image_keys)):
        report.problem(path, "image_keys are not sorted and unique")


def _check_index(root: Path, manifest: dict, stored: dict, report: VerifyReport) -> None:
    index_path = root / INDEX_NAME
    try:
        index = pd.read_parquet(index_path)
    except Exception as exc:  # noqa: BLE001
        report.problem(index_path, f"unreadable ({exc})")
        return
    expected = manifest.get("index", {}).get("sha256")
    if expected and sha256_file(index_path) != expected:
        report.problem(index_path, "sha256 differs from the manifest's (edited after the run?)")
    missing_cols = set(INDEX_COLUMNS) - set(index.columns) - set(FILE_IDENTITY_COLUMNS)
    if "file_size" not in index.columns:
        missing_cols.add("file_size")
    if not any(c in index.columns for c in FILE_IDENTITY_COLUMNS[1:]):
        missing_cols.add("file_sha256 (or file_mtime_ns)")
    if missing_cols:
        report.problem(index_path, f"missing columns {sorted(missing_cols)}")
        return
    dup = index["image_key"][index["image_key"].duplicated()]
    for key in dup.head(10):
        report.problem(index_path, f"image {key!r} has more than one row")
    ok = index[index["status"] == "ok"]
    for key, shard, row in zip(ok["image_key"], ok["shard"], ok["row"]):
        where = stored.get(key)
        if where is None:
            report.problem(index_path, f"ok image {key!r} is in no listed shard")
        elif where != (shard, int(row)):
            report.problem(index_path, f"image {key!r} points at {shard} row {row}, it is stored "
                                       f"at {where[0]} row {where[1]}")
    for key in sorted(set(stored) - set(ok["image_key"]))[:10]:
        report.problem(index_path, f"image {key!r} is stored in {stored[key][0]} but not indexed as ok")
    counts = manifest.get("counts", {})
    if counts.get("ok") != len(ok):
        report.problem(index_path, f"{len(ok)} ok rows, manifest counts {counts.get('ok')}")
    for status in ("error", "skipped"):
        n = int((index["status"] == status).sum())
        if status in counts and counts[status] != n:
            report.problem(index_path, f"{n} {status} rows, manifest counts {counts[status]}")
    if counts.get("ok") is not None and len(stored) != counts["ok"]:
        report.problem(root, f"the shards hold {len(stored)} images, manifest counts {counts['ok']} ok")


def verify_splits(root: Path, manifest: dict, report: VerifyReport) -> None:
    """splits/: files match the manifest, lineage to features/, schema, disjoint splits, unique ids."""
    import pyarrow.parquet as pq

    from ..errors import PrepError
    from ..manifests.features import FeatureStore
    from ..manifests.splits import SPLIT_NAMES, check_lineage, split_leaks, split_path, split_schema

    for name, info in sorted((manifest.get("files") or {}).items()):
        path = root / name
        if not path.is_file():
            report.problem(path, "listed in the manifest but missing")
        elif path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            report.problem(path, "size or sha256 differs from the manifest's (edited or damaged; "
                                 "re-run `prep build-splits`)")
    features = None
    try:
        features = check_lineage(root)
    except PrepError as exc:
        report.problems.append(str(exc))
    expected = split_schema()
    leak_rows = []
    counts = manifest.get("counts") or {}
    keys_seen = set()
    for name in SPLIT_NAMES:
        path = split_path(root, name)
        if not path.is_file():
            report.problem(path, "missing: build-splits writes train, val and test")
            continue
        try:
            schema = pq.read_schema(path)
            table = pq.read_table(path, columns=["image_key", "caption_id"])
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            report.problem(path, f"unreadable parquet ({exc})")
            continue
        for column in expected:
            if column.name not in schema.names:
                report.problem(path, f"missing column {column.name!r}")
            elif not _same_arrow_type(schema.field(column.name).type, column.type):
                report.problem(path, f"column {column.name!r} is {schema.field(column.name).type}, "
                                     f"expected {column.type}")
        keys = table.column("image_key").to_pylist()
        split_keys = set(keys)
        ids = table.column("caption_id").to_pylist()
        leak_rows += [(name, key, caption_id) for key, caption_id in zip(keys, ids)]
        keys_seen |= split_keys
        want = counts.get(name)
        if isinstance(want, int):  # an older manifest counted captions only
            want = {"captions": want, "images": len(split_keys)}
        if want and (want.get("captions"), want.get("images")) != (len(ids), len(split_keys)):
            report.problem(path, f"{len(ids)} captions of {len(split_keys)} images, manifest counts "
                                 f"{want.get('captions')} of {want.get('images')}")
        report.checked.append(path.name)
    for leak in split_leaks(leak_rows):  # the check build-splits makes before writing
        report.problem(root, leak)
    if features is not None:
        try:
            with FeatureStore(features) as store:
                absent = sorted(k for k in keys_seen if k not in store)
        except PrepError as exc:
            report.problems.append(str(exc))
            absent = []
        if absent:
            report.problem(root, f"{len(absent)} images have no ok features in {features}: "
                                 f"{', '.join(map(repr, absent[:10]))}")


def _splits_manifest_digest(splits: str):
    """(the splits manifest a run's lineage names, its sha256 or None when it is not there): a
    local file, or the manifest object of splits at a URL."""
    url = remote.url_of(splits)
    if url is None:
        path = Path(splits) / "manifest.json"
        return path, (sha256_file(path) if path.is_file() else None)
    import hashlib
    name = remote.join(url, "manifest.json")
    try:
        return name, hashlib.sha256(remote.read_bytes(name)).hexdigest()
    except FileNotFoundError:
        return name, None


def verify_run(root: Path, report: VerifyReport) -> None:
    """runs/NAME: every checkpoint loads with weights_only and into the model it describes, its
    config is config.yaml's, its lineage is lineage.json's and the splits it names are unchanged."""
    import yaml

    from ..errors import PrepError
    from .train import BEST, LAST, load_checkpoint

    config_path = root / RUN_CONFIG
    try:
        written = yaml.safe_load(config_path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        report.problem(config_path, f"unreadable ({exc})")
        written = None
    lineage_path = root / "lineage.json"
    lineage = None
    if lineage_path.is_file():
        try:
            lineage = json.loads(lineage_path.read_text("utf-8"))
        except ValueError as exc:
            report.problem(lineage_path, f"not valid JSON ({exc})")
    if not (root / LAST).is_file():
        report.problem(root / LAST, "missing: the run never saved a checkpoint (re-run `prep train`)")
    for path in (root / LAST, root / BEST):
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except PrepError as exc:
            report.problems.append(str(exc))
            continue
        if written is not None and _normal_yaml(ckpt.get("config")) != written:
            report.problem(path, f"its config differs from {config_path.name} (edited after "
                                 "training?); eval reads the checkpoint's copy")
        if lineage is not None and ckpt.get("lineage") != lineage:
            report.problem(path, f"its lineage differs from {lineage_path.name}")
        message = _state_dict_problem(ckpt)
        if message:
            report.problem(path, message)
        lineage = lineage or ckpt.get("lineage")
        report.checked.append(str(path.relative_to(report.root)) if path.is_relative_to(report.root)
                              else str(path))
    if lineage:
        splits_manifest, digest = _splits_manifest_digest(lineage.get("splits", ""))
        if digest is None:
            report.warnings.append(f"{splits_manifest}: not found; the run's lineage cannot be checked here")
        elif digest != lineage.get("splits_manifest_sha256"):
            report.problem(splits_manifest, f"changed since the run {root} was trained on it; "
                                            "evaluate with the splits it was trained on")
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        for number, line in enumerate(metrics.read_text("utf-8").splitlines(), 1):
            try:
                line.strip() and json.loads(line)
            except ValueError:
                report.problem(metrics, f"line {number} is not JSON")
                break


def _normal_yaml(config):
    """A config as config.yaml would read back: through the same YAML dump and safe_load."""
    import yaml

    from ..teran.config import dump_config
    try:
        return yaml.safe_load(dump_config(config))
    except Exception:  # noqa: BLE001 - a config that does not even dump differs
        return None


def _state_dict_problem(ckpt: dict) -> str | None:
    """None when ckpt['model'] loads strictly into the TERAN its config describes (the text
    encoder is rebuilt from the stored text_config, so no encoder files are needed)."""
    import torch
    from transformers import BertConfig, BertModel

    from ..teran.model import TERAN
    try:
        text = BertModel(BertConfig.from_dict(ckpt["text_config"]), add_pooling_layer=False)
        model = TERAN(ckpt["config"], int(ckpt["feature_dim"]), text)
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild is the finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the model state does not load into the model its config describes ({first})"
    bad = [name for name, t in ckpt["model"].items()
           if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        return f"non-finite values in {len(bad)} tensors, e.g. {bad[0]}"
    return None


def _same_arrow_type(got, want) -> bool:
    """Type equality that ignores the name of a list's item field (writers call it item or element)."""
    import pyarrow as pa
    if pa.types.is_list(got) and pa.types.is_list(want):
        return got.value_type.equals(want.value_type)
    return got.equals(want)


VERIFIERS = {FEATURES_FORMAT: verify_features, SPLITS_FORMAT: verify_splits}


# ------------------------------------------------------------------ index/ (prep index)

def verify_index(root: Path, manifest: dict, report: VerifyReport) -> None:
    """index/: the region shards and index.parquet by the features/ rules, then every other file
    against its recorded size and sha256, the FAISS shortlist (one vector per ok image, of the
    recorded dimension), the head (tensors only), the caption set, and the checkpoint lineage."""
    from ..manifests.index import CAPTIONS_NAME, HEAD_NAME, SHORTLIST_NAME, read_captions

    verify_features(root, manifest, report)
    for name, info in sorted((manifest.get("files") or {}).items()):
        path = root / name
        if not path.is_file():
            report.problem(path, "listed in the manifest but missing (rebuild with `prep index --overwrite`)")
            continue
        if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            report.problem(path, "size or sha256 differs from the manifest's (damaged or replaced)")
        report.checked.append(name)
    ok = (manifest.get("counts") or {}).get("ok")
    faiss_info = (manifest.get("shortlist") or {}).get("faiss") or {}
    if (root / SHORTLIST_NAME).is_file():
        try:
            import faiss
            index = faiss.read_index(str(root / SHORTLIST_NAME))
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            report.problem(root / SHORTLIST_NAME, f"not a readable FAISS index ({str(exc).splitlines()[0][:200]})")
        else:
            if index.ntotal != ok:
                report.problem(root / SHORTLIST_NAME, f"{index.ntotal} vectors, the index has {ok} ok images")
            if index.d != faiss_info.get("dim"):
                report.problem(root / SHORTLIST_NAME, f"{index.d}-d vectors, manifest says {faiss_info.get('dim')}")
    if (root / HEAD_NAME).is_file():
        try:
            from ..safe_torch import load_torch_file
            from ..teran.shortlist import ShortlistHead
            head = ShortlistHead.from_payload(load_torch_file(root / HEAD_NAME))
            if head.dim != faiss_info.get("dim"):
                report.problem(root / HEAD_NAME, f"makes {head.dim}-d vectors, the shortlist holds "
                                                 f"{faiss_info.get('dim')}-d ones")
        except Exception as exc:  # noqa: BLE001
            report.problem(root / HEAD_NAME, f"not a loadable shortlist head ({type(exc).__name__})")
    if manifest.get("captions") and (root / CAPTIONS_NAME).is_file():
        try:
            c = read_captions(root / CAPTIONS_NAME)
            if len(c["offsets"]) - 1 != manifest["captions"].get("n_captions") or \
                    c["offsets"][-1] != len(c["words"]):
                report.problem(root / CAPTIONS_NAME, "caption count or offsets disagree with the manifest")
        except Exception as exc:  # noqa: BLE001
            report.problem(root / CAPTIONS_NAME, f"unreadable caption set ({type(exc).__name__})")
    lineage = manifest.get("lineage") or {}
    checkpoint = Path(lineage.get("checkpoint", ""))
    if not checkpoint.is_file():
        report.warnings.append(f"{checkpoint}: the run's checkpoint is not here; search needs it")
    elif sha256_file(checkpoint) != lineage.get("checkpoint_sha256"):
        report.problem(checkpoint, f"changed since the index {root} was built; rebuild it (--overwrite)")


VERIFIERS["teranprep.index"] = verify_index

"""build-splits: captions (Karpathy JSON, CSV, JSONL) + features/ -> tokenized train/val/test splits/."""

from __future__ import annotations

import csv
import hashlib
import json
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import PrepError
from ..manifests.atomic import sha256_file
from ..manifests.features import FeatureStore, manifest_sha256, read_features_manifest
from ..manifests.lineage_warnings import emit, features_warnings, warning_fields
from ..manifests.fingerprint import fingerprint
from ..manifests.splits import (DROPPED_COLUMNS, DROPPED_NAME, MISSING_COLUMNS, MISSING_NAME,
                                SPLIT_NAMES, SPLITS_FORMAT, SPLITS_FORMAT_VERSION, caption_rule_of,
                                clear_splits, existing_splits_manifest, relative_features_path,
                                split_leaks, splits_files_intact, write_report_csv, write_split,
                                write_splits_manifest)
from ..manifests.shards import remove_stale_temps
from ..tokenizers.captions import CaptionTokenizer
from ..tokenizers.text import CAPTION_RULES, DEFAULT_CAPTION_RULE, is_valid_utf8, normalize_caption, printable
from ..tokenizers.wordpiece import load_wordpiece
from ..manifests.ownership import releases_locks
from ..manifests.remote import with_remote_folders

FORMATS = ("karpathy", "csv", "jsonl", "features-index")
RESTVAL_MODES = ("train", "drop", "val")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
# Bumped whenever the seeded split would assign images differently: it is part of the fingerprint.
SPLIT_METHOD = "sha256(seed NUL key) rank, v1"
TOKENIZE_BATCH = 20000


@dataclass
class SplitsResult:
    out: Path
    manifest: dict
    noop: bool
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = self.manifest["counts"]
        parts = ", ".join(f"{name} {counts[name]['captions']} captions / {counts[name]['images']} "
                          "images" for name in SPLIT_NAMES)
        dropped = self.manifest["dropped"]
        lost = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()) if n) or "none"
        head = "build-splits: up to date, nothing to do" if self.noop else \
            f"build-splits: wrote {self.out} in {self.wall_s:.1f}s"
        return (f"{head}\n  {parts}\n  dropped: {lost}; truncated to {self.manifest['tokenizer']['max_tokens']} "
                f"tokens: {self.manifest['truncated']}; caption rule: {caption_rule_of(self.manifest)}")


# ---- caption sources ----
# Each reader yields (caption_id, image_key, raw, source_split, problem) per caption in file
# order; caption_id is the caption's position in the file, so it is stable and unique.
# `problem` is (reason, detail) for rows that cannot be used as they are.

class _Sentence:
    __slots__ = ("raw",)

    def __init__(self, raw):
        self.raw = raw


def _prune_sentence(obj: dict):
    # Called for every JSON object as it is parsed: Karpathy sentences carry tokens, ids and more
    # that we never use; keeping only `raw` frees them at once and bounds the peak memory.
    if "raw" in obj and "filename" not in obj:
        return _Sentence(obj["raw"])
    return obj


def _key_maker(template: str | None, fields: tuple[str, ...], source: Path):
    if template is None:
        return None
    try:
        used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise PrepError(f"--image-key-template {template!r}: {exc}") from exc
    unknown = sorted({name for name in used if name not in fields})
    if unknown or not used:
        raise PrepError(f"--image-key-template {template!r}: use the fields "
                        f"{', '.join('{' + f + '}' for f in fields)} of {source.name} "
                        f"(unknown: {', '.join(unknown) or 'no field at all'})")
    return lambda values: template.format_map(values)


def read_karpathy(path: Path, template: str | None = None) -> tuple[bool, Iterator]:
    """(whether the file assigns splits, caption rows) of a Karpathy dataset_*.json."""
    make_key = _key_maker(template, ("filename", "filepath", "image"), path)
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad caption is reported
    # and dropped instead of the whole file failing to decode.
    text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    try:
        doc = json.loads(text, object_hook=_prune_sentence)
    except json.JSONDecodeError as exc:
        raise PrepError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}); pass a Karpathy dataset_*.json, or --format csv/jsonl") from exc
    del text
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise PrepError(f"{path}: no `images` list, so not a Karpathy JSON (dataset_coco.json); "
                        "for one caption per line pass --format jsonl")
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise PrepError(f"{path}: images[{i}] has no filename; fix the file (Karpathy format: "
                            "images[].filename, sentences[].raw)")
    with_split = sum(1 for image in images if "split" in image)
    if with_split not in (0, len(images)):
        raise PrepError(f"{path}: {with_split} of {len(images)} images have a `split`; give every "
                        "image one or remove them all to use a seeded split (--val/--test)")
    for i, image in enumerate(images):
        split = image.get("split")
        if with_split and split not in KARPATHY_SPLITS:
            raise PrepError(f"{path}: images[{i}] has split {split!r}; expected one of "
                            f"{', '.join(KARPATHY_SPLITS)}")

    def rows():
        caption_id = 0
        for image in images:
            filepath = image.get("filepath") or ""
            key = f"{filepath}/{image['filename']}" if filepath else image["filename"]
            if make_key is not None:
                key = make_key({"filename": image["filename"], "filepath": filepath, "image": key})
            for sentence in image.get("sentences") or ():
                raw = sentence.raw if isinstance(sentence, _Sentence) else None
                problem = None
                if not isinstance(sentence, _Sentence):
                    problem = ("malformed", "sentence without `raw`")
                elif raw is not None and not isinstance(raw, str):
                    problem = ("malformed", f"raw is a {type(raw).__name__}")
                yield caption_id, key, raw, image.get("split"), problem
                caption_id += 1

    return bool(with_split), rows()


def _image_value(value):
    # JSONL ids are often integers (COCO image_id); a template can pad them: '{image:0>12}.jpg'.
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, float)):
        return None
    return str(value)


def read_csv(path: Path, image_column: str = "image", caption_column: str = "caption",
             template: str | None = None) -> tuple[bool, Iterator]:
    """Caption rows of a CSV (TSV for *.tsv) with a header naming the image and caption columns."""
    make_key = _key_maker(template, ("image",), path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","

    def rows():
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            try:
                header = next(reader, None)
                if header is None:
                    raise PrepError(f"{path}: empty file; expected a header with "
                                    f"{image_column!r} and {caption_column!r} columns")
                where = {name.strip(): i for i, name in enumerate(header)}
                if image_column not in where or caption_column not in where:
                    raise PrepError(f"{path}: header {header} lacks {image_column!r} or "
                                    f"{caption_column!r}; name the columns with --image-column "
                                    "and --caption-column")
                i_image, i_caption = where[image_column], where[caption_column]
                need = max(i_image, i_caption)
                caption_id = 0
                for row in reader:
                    if not row:  # a blank line is not a caption
                        continue
                    if len(row) <= need:
                        yield caption_id, row[i_image] if len(row) > i_image else "", None, None, \
                            ("malformed", f"line {reader.line_num}: {len(row)} fields")
                    else:
                        key = row[i_image]
                        if make_key is not None:
                            key = make_key({"image": key})
                        yield caption_id, key, row[i_caption], None, None
                    caption_id += 1
            except csv.Error as exc:
                raise PrepError(f"{path}: malformed CSV at line {reader.line_num} ({exc}); fix "
                                "the quoting there") from exc

    return False, rows()


def read_jsonl(path: Path, image_column: str = "image", caption_column: str = "caption",
               template: str | None = None) -> tuple[bool, Iterator]:
    """Caption rows of a JSON-lines file: one object per line with image and caption fields."""
    make_key = _key_maker(template, ("image",), path)

    def rows():
        caption_id = 0
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                problem, key, raw = None, "", None
                try:
                    obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8",
                                                 "surrogateescape"))
                except ValueError as exc:
                    obj, problem = None, ("malformed", f"line {lineno}: {exc}")
                if obj is not None and not isinstance(obj, dict):
                    problem = ("malformed", f"line {lineno}: not an object")
                elif obj is not None:
                    key = _image_value(obj.get(image_column))
                    raw = obj.get(caption_column)
                    if key is None:
                        problem, key = ("malformed", f"line {lineno}: no {image_column!r}"), ""
                    elif raw is not None and not isinstance(raw, str):
                        problem = ("malformed", f"line {lineno}: {caption_column!r} is a "
                                                f"{type(raw).__name__}")
                    elif make_key is not None:
                        key = make_key({"image": key})
                yield caption_id, key, raw, None, problem
                caption_id += 1

    return False, rows()


def read_features_index(path: Path) -> tuple[bool, Iterator]:
    """Caption rows of a features index.parquet whose input carried captions (extract-regions
    on webdataset / img2dataset tars: each sample's .txt); one caption per image, in key order."""
    import pandas as pd

    def rows():
        try:
            frame = pd.read_parquet(path, columns=None)
        except (OSError, ValueError) as exc:
            raise PrepError(f"{path}: unreadable parquet ({exc}); pass a features index.parquet") from exc
        if not {"image_key", "caption"} <= set(frame.columns):
            raise PrepError(f"{path}: no caption column; only extract-regions on tar shards with .txt "
                            "members writes one; pass a captions file instead")
        if "status" in frame.columns:  # images that failed extraction are listed there already
            frame = frame[frame["status"] == "ok"]
        for caption_id, (key, raw) in enumerate(zip(frame["image_key"], frame["caption"])):
            yield caption_id, str(key), (raw if isinstance(raw, str) and raw else None), None, \
                (None if isinstance(raw, str) and raw else ("empty", "the sample has no .txt caption"))

    return False, rows()


def detect_format(path: Path, given: str | None = None) -> str:
    """karpathy | csv | jsonl | features-index: `given` when set, else from the suffix, else from
    the first bytes."""
    if given and given != "auto":
        if given not in FORMATS:
            raise PrepError(f"--format {given!r}: choose one of {', '.join(FORMATS)}")
        return given
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "features-index"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0]
        try:
            obj = json.loads(first)
        except ValueError:  # one object spanning lines or longer than the sample: a JSON document
            return "karpathy"
        return "karpathy" if isinstance(obj, dict) and "images" in obj else "jsonl"
    if suffix == ".json" or head.startswith(b"["):
        raise PrepError(f"{path}: a JSON file that is not a Karpathy dataset (an object with "
                        "`images`); convert it to JSON lines and pass --format jsonl")
    return "csv"


# ---- splitting ----

def seeded_split(image_keys, *, val: int, test: int, seed: int) -> dict[str, str]:
    """image_key -> train|val|test: images ranked by sha256(seed NUL key); the first `val` go to
    val, the next `test` to test. The rank depends on nothing but the seed and the key, so the
    split is the same on every machine and Python version (unlike hash() or random.shuffle)."""
    keys = sorted(set(image_keys))
    if val + test >= len(keys):
        raise PrepError(f"--val {val} + --test {test} leave no training image: only {len(keys)} "
                        "images have usable captions")
    prefix = f"{seed}\x00".encode("utf-8")
    ranked = sorted(keys, key=lambda k: hashlib.sha256(prefix + k.encode("utf-8")).digest())
    assignment = dict.fromkeys(ranked[val + test:], "train")
    assignment.update(dict.fromkeys(ranked[:val], "val"))
    assignment.update(dict.fromkeys(ranked[val:val + test], "test"))
    return assignment


# ---- the stage ----

def _validate(captions: Path, features: Path, restval: str, val, test, max_tokens: int,
              max_missing: int) -> None:
    if not captions.is_file():
        raise PrepError(f"{captions}: captions file not found; pass a Karpathy JSON, CSV or JSONL")
    if not (features / "manifest.json").is_file():
        raise PrepError(f"{features / 'manifest.json'}: no features manifest; run "
                        "`prep extract-regions` first or point --features at its output")
    if restval not in RESTVAL_MODES:
        raise PrepError(f"--restval {restval!r}: choose one of {', '.join(RESTVAL_MODES)}")
    for name, value in (("--val", val), ("--test", test), ("--max-missing", max_missing)):
        if value is not None and value < 0:
            raise PrepError(f"{name} {value}: must be >= 0")
    if max_tokens < 3:
        raise PrepError(f"--max-tokens {max_tokens}: needs room for [CLS], one token and [SEP] (>= 3)")


def _normalization_hint(missing_rows, ok_keys) -> str:
    """", and 3 keys differ from a features key only in Unicode form (NFC vs NFD), e.g. ..." when
    that is why captions miss their features (macOS file names are NFD, most JSON is NFC)."""
    import unicodedata
    by_form = {unicodedata.normalize("NFC", key): key for key in ok_keys}
    pairs = {}
    for row in missing_rows:
        found = by_form.get(unicodedata.normalize("NFC", row[1]))
        if found is not None:
            pairs.setdefault(row[1], found)
    if not pairs:
        return ""
    key, found = next(iter(pairs.items()))
    return (f"; {len(pairs)} of these keys differ from a features key only in Unicode "
            f"normalization (NFC vs NFD), e.g. {ascii(key)} vs {ascii(found)}")


@with_remote_folders(outputs={"out": None})
@releases_locks
def build_splits(captions: Path, *, features: Path, out: Path, format: str | None = None,
                 image_key_template: str | None = None, image_column: str = "image",
                 caption_column: str = "caption", restval: str = "train", val: int | None = None,
                 test: int | None = None, seed: int = 0, tokenizer: str | None = None,
                 max_tokens: int = 128, max_missing: int = 0, caption_rule: str = DEFAULT_CAPTION_RULE,
                 overwrite: bool = False, echo=None) -> SplitsResult:
    """Tokenized train/val/test splits of `captions`, tied to `features`, written to `out`.

    A finished build with the same inputs and parameters is a no-op (no file is touched); other
    parameters into the same `out` raise PrepError unless `overwrite`. Raises PrepError when more
    than `max_missing` captions have no ok features (they are listed in out/missing.csv).
    """
    t_start = time.perf_counter()
    from ..manifests import remote
    captions_url = remote.url_of(captions)
    # a captions file at a URL is fetched into the cache (its sha256 is the lineage, its URL the path);
    # features at a URL are read through their local mirror (and recorded by URL)
    out = Path(out)
    from ..manifests.ownership import SPLITS, claim_output_dir
    claim_output_dir(out, SPLITS)  # before any work: never into features/ or a file
    captions = remote.fetch_input(captions_url, "captions file") if captions_url else Path(captions)
    features = remote.localize_features(features)
    say = echo or (lambda message: None)
    _validate(captions, features, restval, val, test, max_tokens, max_missing)
    if caption_rule not in CAPTION_RULES:
        raise PrepError(f"--caption-rule {caption_rule!r}: choose one of {', '.join(CAPTION_RULES)}")
    warnings = features_warnings(features, read_features_manifest(features))
    emit("build-splits", warnings)
    fmt = detect_format(captions, format)
    wordpiece = load_wordpiece(tokenizer)
    params = {"format": fmt, "image_key_template": image_key_template,
              "columns": None if fmt == "karpathy" else [image_column, caption_column],
              "restval": restval, "val": val, "test": test, "seed": seed,
              "split_method": SPLIT_METHOD, "max_tokens": max_tokens,
              "tokenizer_vocab_sha256": wordpiece.vocab_sha256,
              "tokenizer_sha256": wordpiece.tokenizer_sha256, "caption_rule": caption_rule}
    params_fp = fingerprint(params)
    inputs = {"captions_sha256": sha256_file(captions),
              "features_manifest_sha256": manifest_sha256(features)}

    previous = existing_splits_manifest(out)
    if previous is not None and not overwrite:
        if previous.get("parameters_fingerprint") != params_fp:
            changed = sorted(k for k in params if previous.get("parameters", {}).get(k) != params[k])
            raise PrepError(f"{out}: holds splits built with other parameters (changed: "
                            f"{', '.join(changed) or 'fingerprint'}); use another --out or pass "
                            "--overwrite to rebuild")
        if previous.get("inputs") == inputs and splits_files_intact(out, previous):
            missing = previous.get("dropped", {}).get("missing_features", 0)
            if missing > max_missing:
                raise PrepError(f"{out / MISSING_NAME}: {missing} captions of these splits have no "
                                f"ok features (--max-missing {max_missing}); raise --max-missing "
                                "or fix the image keys and rebuild with --overwrite")
            return SplitsResult(out, previous, True, time.perf_counter() - t_start)
        say(f"build-splits: {out} is out of date (inputs or files changed); rebuilding")

    source_has_splits, rows = {"karpathy": lambda: read_karpathy(captions, image_key_template),
                               "csv": lambda: read_csv(captions, image_column, caption_column,
                                                       image_key_template),
                               "jsonl": lambda: read_jsonl(captions, image_column, caption_column,
                                                           image_key_template),
                               "features-index": lambda: read_features_index(captions)}[fmt]()
    if source_has_splits and (val is not None or test is not None):
        raise PrepError(f"{captions}: the file assigns its own train/val/test splits; drop --val/"
                        "--test (or remove the `split` fields to use a seeded split)")
    if not source_has_splits and not val and not test:
        raise PrepError(f"{captions}: the file has no train/val/test splits; pass --val N and "
                        "--test N (images) for a seeded split")
    with FeatureStore(features) as store:
        ok_keys = frozenset(store.keys())
    if not ok_keys:
        raise PrepError(f"{features}/index.parquet: no image has ok features; re-run extract-regions")

    kept_ids, kept_keys, kept_raws, kept_clean, kept_split = [], [], [], [], []
    dropped_rows, missing_rows = [], []
    dropped = dict.fromkeys(("invalid_utf8", "empty", "malformed", "duplicate", "restval_dropped",
                             "missing_features"), 0)
    first_of: dict[tuple[str, str], int] = {}
    n_rows = 0
    for caption_id, key, raw, split, problem in rows:
        n_rows += 1
        if problem is None and not is_valid_utf8(key):
            problem = ("invalid_utf8", "image key")
        if problem is None and raw is not None and not is_valid_utf8(raw):
            problem = ("invalid_utf8", "caption")
        clean = "" if problem or raw is None else normalize_caption(raw, caption_rule)
        if problem is None and not clean:
            problem = ("empty", "empty" if not raw else "whitespace only")
        if problem is not None:
            dropped[problem[0]] += 1
            dropped_rows.append((caption_id, printable(key), problem[0], problem[1],
                                 printable(raw) if isinstance(raw, str) else ""))
            continue
        if split == "restval":
            if restval == "drop":
                dropped["restval_dropped"] += 1  # by request, so counted but not listed
                continue
            split = restval
        if key not in ok_keys:
            dropped["missing_features"] += 1
            missing_rows.append((caption_id, key, raw))
            continue
        # Duplicates compare what the model sees: "A dog." and "a  dog." are the same caption.
        seen = first_of.setdefault((key, clean.lower()), caption_id)
        if seen != caption_id:
            dropped["duplicate"] += 1
            dropped_rows.append((caption_id, key, "duplicate", f"same as caption_id {seen}", raw))
            continue
        kept_ids.append(caption_id)
        kept_keys.append(key)
        kept_raws.append(raw)
        kept_clean.append(clean)
        kept_split.append(split)
    del first_of
    if n_rows == 0:
        raise PrepError(f"{captions}: no captions found; check the file and --format")

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    if dropped["missing_features"] > max_missing:
        write_report_csv(out, MISSING_NAME, MISSING_COLUMNS, missing_rows)
        images = len({row[1] for row in missing_rows})
        raise PrepError(f"{out / MISSING_NAME}: {len(missing_rows)} captions ({images} images) have "
                        f"no ok features in {features} (--max-missing {max_missing}); e.g. "
                        f"{missing_rows[0][1]!r} while the features have keys like "
                        f"{min(ok_keys)!r}{_normalization_hint(missing_rows, ok_keys)}: map the "
                        "keys with --image-key-template, extract the missing images, or raise "
                        "--max-missing")
    if not kept_ids:
        write_report_csv(out, DROPPED_NAME, DROPPED_COLUMNS, dropped_rows)
        lost = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
        raise PrepError(f"{captions}: no usable caption left ({lost}); see {out / DROPPED_NAME}")

    if not source_has_splits:
        assignment = seeded_split(kept_keys, val=val or 0, test=test or 0, seed=seed)
        kept_split = [assignment[key] for key in kept_keys]
    leaks = split_leaks(zip(kept_split, kept_keys, kept_ids))
    if leaks:  # refused, not repaired: which split an image belongs to is the file's to say
        raise PrepError(f"{captions}: the splits would leak: {'; '.join(leaks)}; give each image "
                        "one split in the captions file (nothing was written)")

    # The stage is committed to writing now: a previous build goes first, manifest before files.
    clear_splits(out)
    t_tok = time.perf_counter()
    tokenize = CaptionTokenizer(wordpiece, max_tokens)
    # The chunk cache must reproduce whole-caption tokenization; check it on captions spread
    # over the whole input (and on tricky probes, at construction).
    step = max(1, len(kept_clean) // 2000)
    tokenize.check(kept_clean[::step])
    truncated = 0

    def batches(order):
        nonlocal truncated
        for start in range(0, len(order), TOKENIZE_BATCH):
            chunk = order[start:start + TOKENIZE_BATCH]
            words, ids, cut = tokenize([kept_clean[i] for i in chunk])
            truncated += cut
            yield {"image_key": [kept_keys[i] for i in chunk],
                   "caption_id": [kept_ids[i] for i in chunk],
                   "raw": [kept_raws[i] for i in chunk], "words": words, "input_ids": ids}

    files, counts = {}, {}
    for name in SPLIT_NAMES:
        # Rows grouped by image (key order, then caption id): the captions of an image are adjacent.
        order = sorted((i for i, s in enumerate(kept_split) if s == name),
                       key=lambda i: (kept_keys[i], kept_ids[i]))
        files[f"{name}.parquet"] = write_split(out, name, batches(order))
        counts[name] = {"captions": len(order), "images": len({kept_keys[i] for i in order})}
    tokenize_s = time.perf_counter() - t_tok
    files[MISSING_NAME] = write_report_csv(out, MISSING_NAME, MISSING_COLUMNS, missing_rows)
    files[DROPPED_NAME] = write_report_csv(out, DROPPED_NAME, DROPPED_COLUMNS, dropped_rows)
    wall_s = time.perf_counter() - t_start
    kept = len(kept_ids)
    manifest = {
        "format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION, "stage": "build-splits",
        "teranprep_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": params, "parameters_fingerprint": params_fp,
        "inputs": inputs,
        "captions": {"path": captions_url or str(captions.resolve()), "format": fmt, "rows": n_rows, "kept": kept,
                     "split_source": "file" if source_has_splits else "seeded"},
        "features": {"path": relative_features_path(out, features),
                     "manifest_sha256": inputs["features_manifest_sha256"]},
        "tokenizer": {**wordpiece.identity, "max_tokens": max_tokens,
                      "mode": "chunk-cache" if tokenize.chunk_cache else "per-caption"},
        "seed": seed, "counts": counts, "dropped": dropped, "truncated": truncated,
        "files": files, **warning_fields(warnings),
        "timings": {"wall_s": round(wall_s, 3), "tokenize_write_s": round(tokenize_s, 3),
                    "captions_per_s": round(n_rows / wall_s, 1) if wall_s > 0 else None},
    }
    write_splits_manifest(out, manifest)
    return SplitsResult(out, manifest, False, wall_s)

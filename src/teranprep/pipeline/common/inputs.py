"""extract-regions inputs: a folder, webdataset/img2dataset tar shards, or a parquet/CSV list of paths.

Every kind becomes one ordered list of ImageEntry (key, size, mtime_ns), so planning, resume and
verify treat them alike, and one reader (`read_entries`) that yields each entry's bytes and
decoded image in a background thread, so decoding overlaps the detector.

- folder: keys are paths relative to the folder (images.discover_images).
- tars (`images/{00000..00099}.tar`, a glob, or one .tar): the key is `<tar name>/<sample key>`
  (webdataset's sample key: the member name up to its first dot in the basename); the sample's
  .txt becomes the index's `caption`, its .json the index's `metadata`. Entries follow the tars'
  own member order. Nothing is extracted to disk: an uncompressed tar's members are read at the
  data offsets found at discovery (a task reads only its own samples, not the tar up to them);
  a compressed one (.tar.gz, .tgz) is streamed front to back (tarfile stream mode). size = the
  member's size, mtime_ns = the tar file's mtime.
- list (.parquet / .csv with a `path` column, optional `key`): paths relative to the list file's
  folder, or absolute; the key is the `key` column, else the path as written.
"""

from __future__ import annotations

import glob
import queue
import re
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ItemError, PrepError
from .images import (IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageEntry, PassedOver, decode_image,
                     discover_images_with_report)

LIST_SUFFIXES = (".parquet", ".csv")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class InputSet:
    """What extract-regions reads: kind (folder | tars | list), the root keys resolve under, entries."""

    kind: str
    source: str  # as the user gave it (folder, pattern or list file)
    root: str
    entries: list
    tars: tuple = ()  # tars kind: the tar paths, in order
    passed_over: PassedOver = field(default_factory=PassedOver)  # folder kind: what was not listed

    def info(self) -> dict:
        """The manifest's input section (besides listing_sha256 and n_images)."""
        out = {"kind": self.kind, "source": self.source, "root": self.root}
        if self.tars:
            out["tars"] = [Path(t).name for t in self.tars]
        return out


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (zero padding kept; several braces
    expand as a product, left to right), the notation webdataset and img2dataset use."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    if int(hi) < int(lo):
        raise PrepError(f"{pattern}: brace range {match.group(0)} runs backwards; write {{LOW..HIGH}}")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for i in range(int(lo), int(hi) + 1)
            for p in expand_braces(f"{head}{str(i).zfill(width)}{tail}")]


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_source(source: str) -> bool:
    return source.endswith(TAR_SUFFIXES) and not Path(source).is_dir()


def discover_inputs(source, limit: int | None = None) -> InputSet:
    """The InputSet a folder, tar pattern or list file names; PrepError when it names nothing usable."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        entries, passed = discover_images_with_report(path, limit)
        return InputSet("folder", text, str(path.resolve()), entries, passed_over=passed)
    if is_tar_source(text):
        return _discover_tars(text, limit)
    if path.suffix.lower() in LIST_SUFFIXES:
        return _discover_list(path, limit)
    raise PrepError(f"{text}: not a folder, a .tar pattern (images/{{00000..00099}}.tar) or a "
                    ".parquet/.csv list of paths; pass one of those as IMAGES")


# ---------------------------------------------------------------- tar shards

def sample_key(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: (sample key, extension), the key ending at the first
    dot of the basename (`dir/000123.jpg` -> ('dir/000123', 'jpg'))."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _discover_tars(pattern: str, limit) -> InputSet:
    paths = []
    for part in expand_braces(pattern):
        hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        paths.extend(hits)
    if not paths:
        raise PrepError(f"{pattern}: no tar file matches; check the path and the {{LOW..HIGH}} range")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise PrepError(f"{missing[0]}: tar shard not found ({len(missing)} of {len(paths)} named by "
                        f"{pattern} are missing); fix the pattern or the range")
    names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        raise PrepError(f"{pattern}: two tars share a file name; keys are <tar name>/<sample key>, "
                        "so tar names must be unique")
    entries = []
    for tar_path in paths:
        entries.extend(_tar_entries(Path(tar_path)))
        if limit is not None and len(entries) >= limit:
            break
    root = str(Path(paths[0]).resolve().parent)
    return InputSet("tars", pattern, root, entries[:limit] if limit is not None else entries,
                    tars=tuple(str(Path(p).resolve()) for p in paths))


def _tar_entries(tar_path: Path) -> list[ImageEntry]:
    """One entry per sample with an image member, in member order; caption/metadata in `extra`."""
    mtime_ns = tar_path.stat().st_mtime_ns
    with open(tar_path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    samples: dict[str, dict] = {}
    try:
        # seekable mode: an uncompressed tar's headers are read and its data skipped
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                sample = samples.setdefault(key, {})
                if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = member.name
                    sample["size"] = member.size
                    sample["offset"] = member.offset_data
                elif ext == "txt":
                    sample["caption"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                elif ext == "json":
                    sample["metadata"] = tar.extractfile(member).read().decode("utf-8", "replace")
    except (OSError, tarfile.TarError) as exc:
        raise PrepError(f"{tar_path}: unreadable tar shard ({exc}); re-create or drop it") from exc
    entries = []
    for key, sample in samples.items():
        if "image" not in sample:
            continue
        extra = (("caption", sample.get("caption", "")), ("metadata", sample.get("metadata", "")),
                 ("member", sample["image"]), ("tar", str(tar_path.resolve())))
        if not compressed:
            extra += (("offset", sample["offset"]),)
        entries.append(ImageEntry(f"{tar_path.name}/{key}", sample["size"], mtime_ns, extra))
    return entries


# ---------------------------------------------------------------- list files

def _discover_list(path: Path, limit) -> InputSet:
    import pandas as pd
    if not path.is_file():
        raise PrepError(f"{path}: list file not found; pass a .parquet or .csv with a `path` column")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: unreadable list file ({exc}); write a .parquet or .csv with a "
                        "`path` column") from exc
    if "path" not in frame.columns:
        raise PrepError(f"{path}: needs a `path` column (has {list(frame.columns)})")
    paths = [str(p) for p in frame["path"]]
    keys = [str(k) for k in frame["key"]] if "key" in frame.columns else paths
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise PrepError(f"{path}: key {dup!r} is listed twice; every image needs one key")
    root = path.resolve().parent
    entries = []
    for key, rel in list(zip(keys, paths))[:limit]:
        target = root / rel
        try:
            st = target.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1  # recorded as an error row by the reader, not fatal
        extra = (("member", rel),) if key != rel else ()
        entries.append(ImageEntry(key, size, mtime, extra))
    return InputSet("list", str(path), str(root), entries)


# ---------------------------------------------------------------- reading (worker side)

def _entry_bytes(root: Path, entries):
    """(entry, bytes | ItemError) for each entry, in order; tar entries streamed per tar."""
    i = 0
    while i < len(entries):
        entry = entries[i]
        tar_name = entry.extra_dict().get("tar")
        if tar_name is None:
            member = entry.extra_dict().get("member", entry.key)
            try:
                yield entry, (root / member).read_bytes()
            except OSError as exc:
                yield entry, ItemError(f"unreadable file: {exc.strerror or exc}")
            i += 1
            continue
        j = i
        while j < len(entries) and entries[j].extra_dict().get("tar") == tar_name:
            j += 1
        group = entries[i:j]
        read = _read_at_offsets if "offset" in group[0].extra_dict() else _stream_tar
        yield from read(root / tar_name, group)
        i = j


def _read_at_offsets(tar_path: Path, entries):
    """An uncompressed tar's members, read at their data offsets (one open, forward seeks)."""
    try:
        fh = open(tar_path, "rb")
    except OSError as exc:
        for entry in entries:
            yield entry, ItemError(f"tar shard {tar_path.name} unreadable: {exc.strerror or exc}")
        return
    with fh:
        for entry in entries:
            fh.seek(entry.extra_dict()["offset"])
            data = fh.read(entry.size)
            if len(data) != entry.size:
                yield entry, ItemError(f"truncated in {tar_path.name} (the tar changed since discovery?)")
            else:
                yield entry, data


def _stream_tar(tar_path: Path, entries):
    """Streams one tar front to back, yielding the wanted members' bytes in `entries` order
    (entries follow member order, so nothing is held back but out-of-order stragglers)."""
    wanted = {e.extra_dict()["member"]: e for e in entries}
    found: dict[str, bytes] = {}
    pending = list(entries)
    try:
        with tarfile.open(tar_path, "r|*") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
                while pending and pending[0].extra_dict()["member"] in found:
                    entry = pending.pop(0)
                    yield entry, found.pop(entry.extra_dict()["member"])
                if not pending:
                    return
    except (OSError, tarfile.TarError) as exc:
        problem = f"tar shard {tar_path.name} unreadable: {exc}"
    else:
        problem = f"not found in {tar_path.name} (the tar changed since discovery?)"
    for entry in pending:
        yield entry, ItemError(problem)


def entry_digests(root, entries):
    """(entry, sha256 hex of its bytes | None when it cannot be read) per entry, in order: what
    --verify-inputs compares with the sha256 a completed shard recorded."""
    import hashlib
    for entry, data in _entry_bytes(Path(root), list(entries)):
        yield entry, None if isinstance(data, ItemError) else hashlib.sha256(data).hexdigest()


def read_entries(root, entries, prefetch: int = 4, max_pixels: int = MAX_IMAGE_PIXELS):
    """(entry, (image, bytes) | ItemError) per entry, in order, read and decoded `prefetch` ahead
    in a background thread (Pillow's decoders release the GIL), so decoding overlaps detection;
    an image above `max_pixels` is an ItemError."""
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for entry, data in _entry_bytes(Path(root), list(entries)):
                if stop.is_set():
                    return
                if not isinstance(data, ItemError):
                    try:
                        data = (decode_image(data, max_pixels), data)
                    except ItemError as exc:
                        data = exc
                out.put((entry, data))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            out.put(exc)
            return
        out.put(done)

    thread = threading.Thread(target=produce, name="prep-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def read_one(root, entry: ImageEntry):
    """(image, bytes) of one entry, for tools that show a stored image (show-regions)."""
    for _, got in read_entries(root, [entry], prefetch=1):
        if isinstance(got, ItemError):
            raise got
        return got
    raise ItemError(f"{entry.key}: not found")


__all__ = ["InputSet", "discover_inputs", "entry_digests", "expand_braces", "read_entries", "read_one",
           "sample_key"]

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
  folder, or absolute, or URLs; the key is the `key` column, else the path as written.
- URLs (any fsspec URL: `s3://bucket/shards/{00000..00099}.tar`, a prefix `s3://bucket/images/`,
  a list file at a URL): tars are listed by streaming them once (headers, captions, metadata) and
  read member by member with ranged GETs; a prefix is listed (keys relative to it, like a folder)
  and its objects read whole; size = the object's size, mtime_ns = its LastModified, and the
  manifest's input section records each tar's URL, size and ETag.
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
from ...manifests import remote
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
    objects: dict = field(default_factory=dict)  # inputs at URLs: url -> {size, etag} (tars, list file)

    def info(self) -> dict:
        """The manifest's input section (besides listing_sha256 and n_images)."""
        out = {"kind": self.kind, "source": self.source, "root": self.root}
        if self.tars:
            out["tars"] = [_name(t) for t in self.tars]
        if self.objects:
            out["objects"] = {url: {"size": v["size"], "etag": v["etag"]} for url, v in self.objects.items()}
        return out


def _name(location: str) -> str:
    return remote.basename(location) if remote.is_url(location) else Path(location).name


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
    return source.endswith(TAR_SUFFIXES) and (remote.is_url(source) or not Path(source).is_dir())


def discover_inputs(source, limit: int | None = None) -> InputSet:
    """The InputSet a folder, tar pattern or list file names; PrepError when it names nothing usable."""
    url = remote.url_of(source)
    if url is not None:
        return _discover_url(url, limit)
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


# ---------------------------------------------------------------- URLs

def _discover_url(url: str, limit) -> InputSet:
    if is_tar_source(url):
        return _discover_remote_tars(url, limit)
    if url.lower().endswith(LIST_SUFFIXES):
        return _discover_list(url, limit)
    return _discover_prefix(url, limit)


def _discover_prefix(url: str, limit) -> InputSet:
    """Every image object under a prefix, keyed by its path relative to the prefix (sorted)."""
    root = url.rstrip("/")
    objects = remote.listing(root)
    if not objects:
        raise PrepError(f"{url}: no objects under this prefix; check the bucket and the path "
                        "(and --storage-options)")
    passed = PassedOver()
    entries = []
    for rel in sorted(objects):
        if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            passed.add("not an image", rel)
            continue
        meta = objects[rel]
        entries.append(ImageEntry(rel, meta["size"], meta["mtime_ns"]))
        if limit is not None and len(entries) >= limit:
            break
    return InputSet("folder", url, root, entries, passed_over=passed)


def _discover_remote_tars(pattern: str, limit) -> InputSet:
    urls = []
    for part in expand_braces(pattern):
        if any(c in part for c in "*?["):
            fs, _ = remote.filesystem(part)
            with remote.remote_errors(part):
                scheme = part.split("://", 1)[0]
                urls.extend(sorted(f"{scheme}://{p}" for p in fs.glob(remote.filesystem(part)[1])))
        else:
            urls.append(part)
    if not urls:
        raise PrepError(f"{pattern}: no tar object matches; check the URL and the {{LOW..HIGH}} range")
    names = [remote.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise PrepError(f"{pattern}: two tars share a file name; keys are <tar name>/<sample key>, "
                        "so tar names must be unique")
    objects, entries = {}, []
    for i, url in enumerate(urls):
        try:
            objects[url] = remote.info(url)
        except FileNotFoundError:
            missing = sum(not remote.exists(u) for u in urls[i:])
            raise PrepError(f"{url}: tar shard not found ({missing} of {len(urls)} named by {pattern} "
                            "are missing); fix the pattern or the range") from None
        with remote.open_url(url, "rb", block_size=8 << 20, cache_type="readahead") as fh:
            entries.extend(_tar_entries_from(fh, url, remote.basename(url), objects[url]["mtime_ns"], stream=True))
        if limit is not None and len(entries) >= limit:
            break
    root = remote.parent(urls[0])
    return InputSet("tars", pattern, root, entries[:limit] if limit is not None else entries,
                    tars=tuple(urls), objects=objects)


def _open_binary(location: str):
    """A readable binary file: local path or URL (ranged GETs, read ahead in large blocks)."""
    if remote.is_url(location):
        return remote.open_url(remote.url_of(location), "rb", block_size=8 << 20, cache_type="readahead")
    return open(location, "rb")


def _location(root: str, member: str) -> str:
    """Where an entry's bytes are: an absolute path or URL as written, else under the root."""
    if remote.is_url(member) or Path(member).is_absolute():
        return remote.url_of(member) or member
    if remote.is_url(root):
        return remote.join(remote.url_of(root), member)
    return str(Path(root) / member)


def _read_bytes(location: str) -> bytes:
    if remote.is_url(location):
        try:
            return remote.read_bytes(location)
        except FileNotFoundError as exc:
            raise OSError(2, "no such object") from exc
        except PrepError as exc:
            raise OSError(5, str(exc)) from exc
    return Path(location).read_bytes()


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
    try:
        mtime_ns = tar_path.stat().st_mtime_ns
        fh = open(tar_path, "rb")
    except OSError as exc:
        raise PrepError(f"{tar_path}: unreadable tar shard ({exc}); re-create or drop it") from exc
    with fh:
        return _tar_entries_from(fh, str(tar_path.resolve()), tar_path.name, mtime_ns, stream=False)


def _tar_entries_from(fh, location: str, name: str, mtime_ns: int, stream: bool) -> list[ImageEntry]:
    """The entries of one tar read from `fh`: seekable mode skips an uncompressed tar's data on
    disk; a tar at a URL is streamed once front to back (one GET, read ahead)."""
    try:
        compressed = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
    except (OSError, ValueError) as exc:
        raise PrepError(f"{location}: unreadable tar shard ({exc}); re-create or drop it") from exc
    tar_path = location
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=fh, mode="r|*" if stream else "r:*") as tar:
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
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise PrepError(f"{tar_path}: unreadable tar shard ({exc}); re-create or drop it") from exc
    except PrepError:
        raise
    entries = []
    for key, sample in samples.items():
        if "image" not in sample:
            continue
        extra = (("caption", sample.get("caption", "")), ("metadata", sample.get("metadata", "")),
                 ("member", sample["image"]), ("tar", location))
        if not compressed:
            extra += (("offset", sample["offset"]),)
        entries.append(ImageEntry(f"{name}/{key}", sample["size"], mtime_ns, extra))
    return entries


# ---------------------------------------------------------------- list files

def _discover_list(path, limit) -> InputSet:
    import pandas as pd
    list_url = remote.url_of(path)
    objects = {}
    if list_url is not None:
        try:
            objects[list_url] = remote.info(list_url)
        except FileNotFoundError:
            raise PrepError(f"{list_url}: list file not found; pass a .parquet or .csv with a `path` column") from None
        local = remote.fetch_input(list_url, "list file")
    else:
        local = path = Path(path)
        if not path.is_file():
            raise PrepError(f"{path}: list file not found; pass a .parquet or .csv with a `path` column")
    try:
        frame = pd.read_parquet(local) if local.suffix.lower() == ".parquet" else pd.read_csv(local, dtype=str)
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
    root = remote.parent(list_url) if list_url else str(path.resolve().parent)
    listed = _remote_sizes([_location(root, rel) for rel in paths[:limit]])
    entries = []
    for key, rel in list(zip(keys, paths))[:limit]:
        where = _location(root, rel)
        if remote.is_url(where):
            meta = listed.get(where)
            size, mtime = (meta["size"], meta["mtime_ns"]) if meta else (-1, -1)
        else:
            try:
                st = Path(where).stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # recorded as an error row by the reader, not fatal
        extra = (("member", rel),) if key != rel else ()
        entries.append(ImageEntry(key, size, mtime, extra))
    return InputSet("list", list_url or str(path), root, entries, objects=objects)


def _remote_sizes(locations: list) -> dict:
    """{url: {size, mtime_ns, etag}} of the URLs among `locations`: one listing per folder they
    sit in (not one request per image); a URL absent from its folder's listing is left out."""
    folders: dict[str, list] = {}
    for where in locations:
        if remote.is_url(where):
            folders.setdefault(remote.parent(where), []).append(where)
    found = {}
    for folder, urls in folders.items():
        fs, path = remote.filesystem(folder)
        with remote.remote_errors(folder):
            try:
                listed = fs.ls(path, detail=True, refresh=True)
            except FileNotFoundError:
                continue
        scheme = folder.split("://", 1)[0]
        by_url = {f"{scheme}://{i['name']}": remote.object_info(i) for i in listed}
        found.update({u: by_url[u] for u in urls if u in by_url})
    return found


# ---------------------------------------------------------------- reading (worker side)

def _entry_bytes(root: str, entries):
    """(entry, bytes | ItemError) for each entry, in order; tar entries streamed per tar."""
    root = remote.url_of(root) or str(root)
    i = 0
    while i < len(entries):
        entry = entries[i]
        tar_name = entry.extra_dict().get("tar")
        if tar_name is None:
            member = entry.extra_dict().get("member", entry.key)
            try:
                yield entry, _read_bytes(_location(root, member))
            except OSError as exc:
                yield entry, ItemError(f"unreadable file: {exc.strerror or exc}")
            i += 1
            continue
        j = i
        while j < len(entries) and entries[j].extra_dict().get("tar") == tar_name:
            j += 1
        group = entries[i:j]
        read = _read_at_offsets if "offset" in group[0].extra_dict() else _stream_tar
        yield from read(_location(root, tar_name), group)
        i = j


def _read_at_offsets(tar_path: str, entries):
    """An uncompressed tar's members, read at their data offsets (one open, forward seeks; at a
    URL, ranged GETs read ahead in large blocks)."""
    name = _name(tar_path)
    try:
        fh = _open_binary(tar_path)
    except (OSError, PrepError) as exc:
        for entry in entries:
            yield entry, ItemError(f"tar shard {name} unreadable: {getattr(exc, 'strerror', None) or exc}")
        return
    with fh:
        for entry in entries:
            fh.seek(entry.extra_dict()["offset"])
            data = fh.read(entry.size)
            if len(data) != entry.size:
                yield entry, ItemError(f"truncated in {name} (the tar changed since discovery?)")
            else:
                yield entry, data


def _stream_tar(tar_path: str, entries):
    """Streams one tar front to back, yielding the wanted members' bytes in `entries` order
    (entries follow member order, so nothing is held back but out-of-order stragglers)."""
    wanted = {e.extra_dict()["member"]: e for e in entries}
    found: dict[str, bytes] = {}
    pending = list(entries)
    name = _name(tar_path)
    try:
        with _open_binary(tar_path) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
                while pending and pending[0].extra_dict()["member"] in found:
                    entry = pending.pop(0)
                    yield entry, found.pop(entry.extra_dict()["member"])
                if not pending:
                    return
    except (OSError, tarfile.TarError, PrepError) as exc:
        problem = f"tar shard {name} unreadable: {exc}"
    else:
        problem = f"not found in {name} (the tar changed since discovery?)"
    for entry in pending:
        yield entry, ItemError(problem)


def entry_digests(root, entries):
    """(entry, sha256 hex of its bytes | None when it cannot be read) per entry, in order: what
    --verify-inputs compares with the sha256 a completed shard recorded."""
    import hashlib
    for entry, data in _entry_bytes(str(root), list(entries)):
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
            for entry, data in _entry_bytes(str(root), list(entries)):
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

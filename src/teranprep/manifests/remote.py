"""Object storage (any fsspec URL: s3://, gs://, az://, ...) under the local-disk formats.

Nothing here changes a format: a features/ folder at a URL holds the same objects, named the same,
as one on disk. Three pieces:

- access: `url_of` recognises a URL (also after pathlib collapsed `s3://b/x` into `s3:/b/x`),
  `filesystem` opens it with the storage options of this process (`--storage-options JSON`, kept
  in $TERANPREP_STORAGE_OPTIONS so DataLoader and local dask workers inherit them; tasks for a
  remote cluster carry them), and `remote_errors` turns what the storage client raises (no
  credentials, unreachable endpoint, access denied, no such bucket) into one PrepError line;
- `RemoteFolder`: a stage's output folder at a URL, worked on through a private local mirror of
  its small files (plan, markers, index, manifest); shards are written by the workers to their own
  temp space and uploaded as single objects (an object store shows an object whole or not at all);
- `localize_features`: a features/ URL read through a local cache (manifest + index, and whole
  shards fetched on first use, sha256-checked against the manifest, least recently used evicted
  beyond $TERANPREP_CACHE_GB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

from ..errors import PrepError

STORAGE_ENV = "TERANPREP_STORAGE_OPTIONS"
CACHE_DIR_ENV = "TERANPREP_CACHE_DIR"
CACHE_GB_ENV = "TERANPREP_CACHE_GB"
DEFAULT_CACHE_GB = 20.0
REMOTE_MARK = ".remote.json"  # in a local mirror: the URL it mirrors
LOCK_NAME = ".prep-lock.json"  # in a folder at a URL: who writes it now (see RemoteFolder.lock)
SECRET_KEYS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "account_key", "sas_token", "client_secret")

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/+(.*)$")


def url_of(location) -> str | None:
    """`location` as a URL when it names one (scheme://...; file:// is a local path), else None.
    pathlib turns `s3://b/x` into `s3:/b/x`; that form is recognised and repaired."""
    if location is None:
        return None
    text = str(location)
    match = _URL.match(text)
    if not match or len(match.group(1)) < 2:  # C:/ on Windows is a drive, not a scheme
        return None
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return None
    return f"{scheme}://{rest}"


def is_url(location) -> bool:
    return url_of(location) is not None


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- storage options

def parse_storage_options(text: str | None) -> dict:
    """--storage-options JSON -> dict; one line when it is not a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PrepError(f"--storage-options: not JSON ({exc}); pass an object, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' or '{\"anon\": true}'") from exc
    if not isinstance(value, dict):
        raise PrepError("--storage-options must be a JSON object, e.g. '{\"profile\": \"prod\"}'")
    return value


def set_storage_options(options: dict | str | None) -> None:
    """The storage options of this process and the processes it starts (an empty one clears them)."""
    if isinstance(options, str):
        options = parse_storage_options(options)
    if options:
        os.environ[STORAGE_ENV] = json.dumps(options, sort_keys=True)
    else:
        os.environ.pop(STORAGE_ENV, None)


def storage_options() -> dict:
    try:
        return json.loads(os.environ.get(STORAGE_ENV) or "{}")
    except ValueError:
        return {}


def storage_options_text() -> str:
    """What a task carries to a worker on another machine (it does not inherit our environment)."""
    return os.environ.get(STORAGE_ENV, "")


def redacted(options: dict | None = None) -> dict:
    """Storage options as a manifest may record them: secrets replaced by '***'."""
    options = storage_options() if options is None else options
    return {k: ("***" if k.lower() in SECRET_KEYS else v) for k, v in options.items()}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`, with this process's storage options."""
    import fsspec
    options = dict(storage_options())
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "s3a"):
        # a dead endpoint should fail in seconds, not after botocore's minutes of retries
        config = dict(options.pop("config_kwargs", {}) or {})
        config.setdefault("connect_timeout", 5)
        config.setdefault("retries", {"max_attempts": 2})
        options["config_kwargs"] = config
    with remote_errors(url):
        try:
            fs, path = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise PrepError(f"{url}: no fsspec implementation for {scheme}:// is installed "
                            f"({exc}); pip install the package fsspec names") from exc
    return fs, path


_HINTS = (
    ("NoCredentials", "no credentials found; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a "
                      "profile (--storage-options '{\"profile\": \"NAME\"}'), or '{\"anon\": true}' for a public bucket"),
    ("PartialCredentials", "incomplete credentials; set both the key and the secret"),
    ("EndpointConnection", "cannot reach the storage endpoint; check endpoint_url in --storage-options "
                           "and the network"),
    ("ConnectTimeout", "cannot reach the storage endpoint; check endpoint_url and the network"),
    ("ConnectionError", "cannot reach the storage endpoint; check endpoint_url and the network"),
    ("InvalidAccessKeyId", "the access key is not valid for this endpoint; check the credentials"),
    ("SignatureDoesNotMatch", "the secret key does not match the access key; check the credentials"),
    ("PermissionError", "access denied; check the credentials and the bucket's policy"),
    ("AccessDenied", "access denied; check the credentials and the bucket's policy"),
    ("NoSuchBucket", "no such bucket; check the bucket name (and endpoint_url)"),
    ("FileNotFoundError", "no such object or prefix; check the URL"),
    ("InvalidEndpoint", "endpoint_url is not a valid URL; write it as http(s)://host:port"),
    ("ValueError", "check the URL and --storage-options"),
)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def error_line(url: str, exc: BaseException) -> str:
    """One line: the URL, what the storage said (first line), and the fix."""
    names = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    hint = next((h for key, h in _HINTS if key in names), "check the URL, the credentials and "
                "--storage-options")
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"{url}: {type(exc).__name__}: {text}; {hint}"


@contextlib.contextmanager
def remote_errors(url: str):
    """Storage failures as one PrepError line naming the URL (PrepError passes through).
    A missing object (FileNotFoundError) passes through too: callers decide what it means."""
    try:
        yield
    except (PrepError, FileNotFoundError):
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, gcsfs ... raise their own types
        raise PrepError(error_line(url, exc)) from exc


# ---------------------------------------------------------------- object operations

def listing(url: str) -> dict:
    """{path relative to url: {"size", "etag", "mtime_ns"}} of every object under the prefix
    (empty when there is none)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.invalidate_cache()
        try:
            found = fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
    base = path.rstrip("/") + "/"
    return {name[len(base):]: object_info(info) for name, info in found.items()
            if name.startswith(base) and info.get("type", "file") != "directory"}


def object_info(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    modified = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated")
    mtime_ns = 0
    if hasattr(modified, "timestamp"):
        mtime_ns = int(modified.timestamp() * 1e9)
    elif isinstance(modified, (int, float)):
        mtime_ns = int(modified * 1e9)
    return {"size": int(info.get("size") or 0), "etag": str(etag).strip('"'), "mtime_ns": mtime_ns}


def info(url: str) -> dict:
    """{"size", "etag", "mtime_ns"} of one object; FileNotFoundError when there is none."""
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.invalidate_cache(path)
        return object_info(fs.info(path))


def exists(url: str) -> bool:
    try:
        info(url)
        return True
    except FileNotFoundError:
        return False


def open_url(url: str, mode: str = "rb", **kwargs):
    fs, path = filesystem(url)
    with remote_errors(url):
        return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with remote_errors(url):
        return fs.cat_file(path)


def put_bytes(url: str, data: bytes) -> None:
    """One object, whole (a single PUT)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.pipe_file(path, data)


def put_file(local: Path, url: str) -> None:
    """One object from a local file: visible only once the whole upload completed (a single PUT,
    or a multipart upload the store shows only when it is completed)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.put_file(str(local), path)


def get_file(url: str, local: Path) -> None:
    """Downloads one object to `local`, atomically (temp name, rename)."""
    fs, path = filesystem(url)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        with remote_errors(url):
            fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with remote_errors(url):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _hash_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- the local cache

def cache_root() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "teranprep", "remote")
    return Path(root)


def cache_limit_bytes() -> int:
    try:
        gb = float(os.environ.get(CACHE_GB_ENV) or DEFAULT_CACHE_GB)
    except ValueError:
        gb = DEFAULT_CACHE_GB
    return int(gb * (1 << 30))


def set_cache(cache_dir=None, cache_gb: float | None = None) -> None:
    """--cache-dir / --cache-gb for this process and the processes it starts."""
    if cache_dir is not None:
        os.environ[CACHE_DIR_ENV] = str(Path(cache_dir).resolve())
    if cache_gb is not None:
        if not cache_gb > 0:
            raise PrepError("--cache-gb must be > 0")
        os.environ[CACHE_GB_ENV] = repr(float(cache_gb))


def fetch_input(url: str, what: str = "input") -> Path:
    """A small input file at a URL (a captions file, a list file) as a local copy in the cache,
    fetched again when its size or ETag changed."""
    try:
        meta = info(url)
    except FileNotFoundError:
        raise PrepError(f"{url}: {what} not found; check the URL") from None
    folder = cache_root() / "inputs" / _hash_key(url)
    local = folder / basename(url)
    stamp = folder / REMOTE_MARK
    try:
        current = json.loads(stamp.read_text("utf-8")) == {"url": url, **meta} and local.is_file()
    except (OSError, ValueError):
        current = False
    if not current:
        get_file(url, local)
        stamp.write_text(json.dumps({"url": url, **meta}), "utf-8")
    return local


def mirror_url(path) -> str | None:
    """The URL a local mirror folder stands for (None for an ordinary folder)."""
    try:
        return json.loads((Path(path) / REMOTE_MARK).read_text("utf-8"))["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def location(path) -> str:
    """What to call a folder in messages and lineage: its URL when it is a mirror of one."""
    return url_of(path) or mirror_url(path) or str(path)


_localized: dict = {}  # url -> (mirror, time): one listing per URL per process and minute


def localize_features(path) -> Path:
    """A features/ folder to read: a local path unchanged; a URL as its local mirror (manifest
    and index fetched again when the manifest object changed; shards fetched on first read)."""
    url = url_of(path)
    if url is None:
        return Path(path)
    url = url.rstrip("/")
    mirror = cache_root() / "features" / _hash_key(url)
    seen = _localized.get((url, str(mirror)))
    if seen is not None and time.monotonic() - seen < 60 and (mirror / REMOTE_MARK).is_file():
        return mirror
    try:
        meta = info(join(url, "manifest.json"))
    except FileNotFoundError:
        raise PrepError(f"{url}/manifest.json: no features manifest at this URL; run `prep "
                        "extract-regions` into it first (or finish the run)") from None
    mirror.mkdir(parents=True, exist_ok=True)
    try:
        recorded = json.loads((mirror / REMOTE_MARK).read_text("utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("manifest") != meta or not (mirror / "index.parquet").is_file():
        import shutil
        (mirror / REMOTE_MARK).unlink(missing_ok=True)
        shutil.rmtree(mirror / "shards", ignore_errors=True)  # cached shards of the old manifest
        get_file(join(url, "manifest.json"), mirror / "manifest.json")
        try:
            get_file(join(url, "index.parquet"), mirror / "index.parquet")
        except FileNotFoundError:
            (mirror / "index.parquet").unlink(missing_ok=True)
        (mirror / REMOTE_MARK).write_text(json.dumps({"url": url, "manifest": meta}), "utf-8")
    _localized[(url, str(mirror))] = time.monotonic()
    _mirror_names[str(mirror)] = url
    return mirror


def ensure_shard(mirror: Path, shard: str) -> Path:
    """`mirror/shard`, fetched whole from the mirror's URL when absent, checked against the size
    and sha256 the manifest records, then the least recently used shards evicted until the cache
    is within its limit. Concurrent readers each download under their own temp name; the rename
    makes one copy win."""
    target = Path(mirror) / shard
    if target.is_file():
        os.utime(target)  # the LRU clock
        return target
    url = mirror_url(mirror)
    if url is None:
        return target
    manifest = json.loads((Path(mirror) / "manifest.json").read_text("utf-8"))
    entry = next((s for s in manifest.get("shards", []) if s.get("path") == shard), None)
    tmp = target.with_name(f".{target.name}.fetch-{socket.gethostname()}-{os.getpid()}")
    try:
        try:
            get_file(join(url, shard), tmp)
        except FileNotFoundError:
            raise PrepError(f"{join(url, shard)}: shard object missing; run `prep verify {url}`") from None
        if entry is not None:
            if tmp.stat().st_size != entry.get("bytes"):
                raise PrepError(f"{join(url, shard)}: {tmp.stat().st_size} bytes, the manifest says "
                                f"{entry.get('bytes')}; run `prep verify {url}`")
            from .atomic import sha256_file
            if entry.get("sha256") and sha256_file(tmp) != entry["sha256"]:
                raise PrepError(f"{join(url, shard)}: sha256 differs from the manifest's; run "
                                f"`prep verify {url}`")
        evict(cache_root(), cache_limit_bytes() - tmp.stat().st_size, keep=target)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def evict(root: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Deletes the least recently used cached shards (any mirror under `root`) until those left
    take at most `budget` bytes. A shard a reader has open stays readable (its descriptor keeps
    the data); a reader that opens it again fetches it again."""
    files = []
    for path in (Path(root) / "features").glob("*/shards/*.h5"):
        try:
            st = path.stat()
        except OSError:
            continue
        if keep is None or path != keep:
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= max(budget, 0):
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


# ---------------------------------------------------------------- an output folder at a URL

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


class RemoteFolder:
    """A stage's output folder at `url`, worked on through a local mirror of its small files.

    One writer per folder: a lock object (LOCK_NAME: host, pid, time) is written when a run starts
    and removed when it ends. A run refuses a folder whose lock names another live holder; a lock
    left by a killed run on this host (its pid gone) is taken over; one from another host is
    refused with the command to remove it. An object store has no atomic create-if-absent that
    every implementation offers, so two drivers started within the same second can both pass the
    check: this is a guard against mistakes, not a mutual exclusion (docs/ARCHITECTURE.md).
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        # one mirror per process: a dry run (or a refused second run) never touches a running one's
        self.mirror = cache_root() / "out" / f"{_hash_key(self.url)}-{os.getpid()}"
        self.objects: dict = {}
        self.locked = False

    def pull(self, names=lambda rel: not rel.endswith(".h5")) -> Path:
        """The mirror, emptied and filled with the folder's small objects (every object but
        shards); `objects` lists every object under the URL (size, etag)."""
        import shutil
        self.objects = listing(self.url)
        for other in self.mirror.parent.glob(f"{_hash_key(self.url)}-*"):  # left by killed runs
            pid = other.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                shutil.rmtree(other, ignore_errors=True)
        self.mirror.mkdir(parents=True)
        for rel in sorted(self.objects):
            if rel != LOCK_NAME and names(rel):
                get_file(join(self.url, rel), self.mirror / rel)
        (self.mirror / REMOTE_MARK).write_text(json.dumps({"url": self.url}), "utf-8")
        _mirror_names[str(self.mirror)] = self.url
        return self.mirror

    def sizes(self, prefix: str) -> dict:
        """{name: size} of the objects directly under `prefix/` (e.g. shards/)."""
        head = prefix.rstrip("/") + "/"
        return {rel[len(head):]: meta["size"] for rel, meta in self.objects.items()
                if rel.startswith(head) and "/" not in rel[len(head):]}

    def lock(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        try:
            current = json.loads(read_bytes(join(self.url, LOCK_NAME)))
        except FileNotFoundError:
            current = None
        except ValueError:
            current = None
        if current and not self._stale(current):
            raise PrepError(f"{self.url}: another run writes here (lock {LOCK_NAME}: host "
                            f"{current.get('host')}, pid {current.get('pid')}); wait for it, or, if "
                            f"no run is active, delete {join(self.url, LOCK_NAME)}")
        put_bytes(join(self.url, LOCK_NAME), json.dumps(holder).encode())
        self.locked = True

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid") or 0)
        return pid == os.getpid() or not _alive(pid)

    def unlock(self) -> None:
        """The lock object removed (when this run wrote it) and the local mirror deleted: every
        object it held is in the bucket."""
        import shutil
        if self.locked:
            try:
                remove(join(self.url, LOCK_NAME))
            except PrepError:
                pass
            self.locked = False
        shutil.rmtree(self.mirror, ignore_errors=True)

    def push(self, rel: str) -> None:
        """The mirror's `rel` to the URL (one object), or its object removed when the mirror has none."""
        local = self.mirror / rel
        if local.is_file():
            put_file(local, join(self.url, rel))
        else:
            remove(join(self.url, rel))

    def remove(self, rel: str) -> None:
        remove(join(self.url, rel))

    def clear(self) -> None:
        """--overwrite: every object of the folder but the lock deleted."""
        for rel in list(self.objects):
            if rel != LOCK_NAME:
                remove(join(self.url, rel))
        self.objects = {k: v for k, v in self.objects.items() if k == LOCK_NAME}

    # ------------------------------------------------ a whole-folder stage (splits, runs, index)

    def snapshot(self) -> dict:
        """{relative name: (size, mtime_ns)} of the mirror's files that belong in the bucket (not
        the mirror mark, the local lock file or a temp file of an unfinished write)."""
        from .atomic import TMP_MARK
        from .ownership import LOCK_NAME as LOCAL_LOCK
        found = {}
        for path in self.mirror.rglob("*"):
            if not path.is_file() or path.name in (REMOTE_MARK, LOCAL_LOCK, LOCK_NAME) or TMP_MARK in path.name:
                continue
            st = path.stat()
            found[path.relative_to(self.mirror).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found

    def upload_changes(self, before: dict) -> int:
        """Makes the folder at the URL what the mirror is now, changing only what changed since
        `before` (a snapshot taken after pull). A manifest that changes is removed first and put
        back last, so a reader never takes a new manifest with old files, or the reverse."""
        now = self.snapshot()
        changed = sorted(rel for rel, stat in now.items() if before.get(rel) != stat)
        gone = sorted(rel for rel in before if rel not in now)

        def is_manifest(rel):
            return basename(rel) == "manifest.json"
        for rel in [r for r in changed + gone if is_manifest(r)]:
            self.remove(rel)
        for rel in [r for r in changed if not is_manifest(r)]:
            self.push(rel)
        for rel in [r for r in gone if not is_manifest(r)]:
            self.remove(rel)
        for rel in sorted((r for r in changed if is_manifest(r)), key=lambda r: -r.count("/")):
            self.push(rel)  # the innermost first, the folder's own manifest last
        return len(changed) + len(gone)


@contextlib.contextmanager
def output_folder(out, *, create: bool = True):
    """The folder a whole-folder stage (build-splits, train, eval, index, import-features, ...)
    writes: a local path unchanged; a URL as a private local mirror of every object under it,
    locked (one writer per folder) and uploaded when the stage ends, however it ends (done, error,
    Ctrl-C: what the stage kept on disk is what the bucket keeps). `create` False (a dry run):
    no lock and no upload."""
    url = url_of(out)
    if url is None:
        yield out
        return
    target = RemoteFolder(url)
    try:
        mirror = target.pull(names=lambda rel: True)
        before = target.snapshot()
        if create:
            target.lock()
        try:
            yield mirror
        finally:
            if target.locked:
                target.upload_changes(before)
    finally:
        target.unlock()


def localize_folder(path, what: str = "folder") -> Path:
    """A folder to read (splits/, a run, an index): a local path unchanged; a URL as a local copy
    of every object under it in the cache, objects fetched again when their size or ETag changed
    (one listing per call). The copy carries the URL (REMOTE_MARK), so lineage names the URL."""
    url = url_of(path)
    if url is None:
        return Path(path)
    url = url.rstrip("/")
    objects = {rel: meta for rel, meta in listing(url).items() if rel != LOCK_NAME}
    if not objects and exists(url):  # one object (a checkpoint file given as a run): that file
        return fetch_input(url, what)
    if not objects:
        raise PrepError(f"{url}: no {what} at this URL (no object under it); check the URL, or "
                        "write the folder there first")
    mirror = cache_root() / "folders" / _hash_key(url)
    try:
        known = json.loads((mirror / REMOTE_MARK).read_text("utf-8")).get("objects", {})
    except (OSError, ValueError, AttributeError):
        known = {}
    (mirror / REMOTE_MARK).unlink(missing_ok=True)  # incomplete until every object is here
    for rel, meta in sorted(objects.items()):
        if known.get(rel) != meta or not (mirror / rel).is_file():
            get_file(join(url, rel), mirror / rel)
    for rel in known:
        if rel not in objects:
            (mirror / rel).unlink(missing_ok=True)
    (mirror / REMOTE_MARK).write_text(json.dumps({"url": url, "objects": objects}), "utf-8")
    _mirror_names[str(mirror)] = url
    return mirror


def local_file(path, what: str = "file") -> Path:
    """A file to read: a local path unchanged; a URL fetched into the cache (fetch_input)."""
    url = url_of(path)
    return Path(path) if url is None else fetch_input(url, what)


def lineage_location(path) -> str:
    """What lineage records for a file or folder: its URL when it is at one, or inside a local
    mirror of one (URL + the relative name); else its absolute local path."""
    url = url_of(path)
    if url is not None:
        return url
    local = Path(os.path.abspath(path))
    for folder in (local, *local.parents):
        found = mirror_url(folder)
        if found:
            rel = local.relative_to(folder).as_posix()
            return found if rel == "." else join(found, rel)
    return str(Path(path).resolve())


def beside_run(run, name: str) -> str | None:
    """RUN_URL/name for a run at a URL (a checkpoint object's folder when RUN names the file):
    where a stage's default output goes, as it goes into RUN/name on disk. None for a local run."""
    url = url_of(run)
    if url is None:
        return None
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.invalidate_cache(path)
        one_object = fs.isfile(path)  # a prefix (a folder) is not a file
    return join(parent(url) if one_object else url, name)


def with_remote_folders(*, inputs=(), outputs=None):
    """Decorates a whole-folder stage: each argument named in `inputs` that is a URL becomes its
    local copy (localize_folder); each one named in `outputs` ({name: default}) becomes the
    mirror of output_folder, uploaded when the stage returns or raises. `default(arguments)` gives
    the URL an output that was left None takes (eval's RUN/eval-..., when RUN is a URL). A
    `dry_run` argument that is true reads the folder but neither locks nor uploads it."""
    import functools
    import inspect
    outputs = dict(outputs or {})

    def wrap(stage):
        signature = inspect.signature(stage)

        @functools.wraps(stage)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            given = bound.arguments
            for name, default in outputs.items():
                value = default(given) if given.get(name) is None and default is not None else None
                if value is not None:
                    given[name] = value
            if not any(url_of(given.get(n)) for n in (*inputs, *outputs)):
                return stage(*bound.args, **bound.kwargs)
            with contextlib.ExitStack() as stack:
                for name in outputs:
                    if url_of(given.get(name)):
                        given[name] = stack.enter_context(
                            output_folder(given[name], create=not given.get("dry_run")))
                for name in inputs:
                    if url_of(given.get(name)):
                        given[name] = localize_folder(given[name], name.replace("_", " "))
                return stage(*bound.args, **bound.kwargs)
        return run
    return wrap


_mirror_names: dict = {}  # local mirror or cached copy (str) -> the URL it stands for, this process


def relabel(text: str) -> str:
    """A message with every local mirror or cached copy of a URL folder this process made
    replaced by that URL: the user named the URL and should read it back."""
    for local, url in sorted(_mirror_names.items(), key=lambda item: -len(item[0])):
        text = text.replace(local, url)
    return text

"""Which stage owns an output folder, and the checks every stage makes before writing into one.

A folder belongs to the stage whose manifest (or, for a run still in progress, whose marker
files) it holds. A stage refuses a folder that holds another stage's output, a folder inside a
data folder of another stage (features/, splits/, an index, ...), a path that is a file, and a
folder it cannot write to; each refusal is one PrepError line naming the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PrepError

FEATURES = "teranprep.features"
SPLITS = "teranprep.splits"
RUN = "teranprep.run"
EVAL = "teranprep.eval"
EXPORT = "teranprep.export"
SYNTHETIC = "teranprep.synthetic"
DETECTOR_RUN = "teranprep.detector-run"
INDEX = "teranprep.index"
RELEVANCE = "teranprep.relevance"
SHORTLIST = "teranprep.shortlist"

# What a user reads in a refusal, and the command that made such a folder.
DESCRIPTIONS = {
    FEATURES: "region features (extract-regions / import-features)",
    SPLITS: "caption splits (build-splits)",
    RUN: "a TERAN training run (train)",
    EVAL: "an evaluation (eval)",
    EXPORT: "exported features (export-features)",
    SYNTHETIC: "a synthetic dataset (make-synthetic)",
    DETECTOR_RUN: "a detector training run (train-detector)",
    INDEX: "a search index (index)",
    RELEVANCE: "a relevance cache (eval)",
    SHORTLIST: "a shortlist head (train-shortlist)",
}
# Files that mark a folder as a stage's even before its manifest exists (a run in progress).
_MARKERS = (
    (RUN, ("checkpoint_last.pt", "checkpoint_best.pt", "lineage.json")),
    (DETECTOR_RUN, ("model_final.pth", "last.pth")),
    (EVAL, ("rankings.npz",)),
    (EXPORT, ("export.json",)),
    (SYNTHETIC, ("synthetic.json",)),
    (SPLITS, ("train.parquet", "val.parquet", "test.parquet")),
    (FEATURES, ("index.parquet", "shards")),
)
# Written by claim_output_dir into every folder a stage claims, so that a folder whose stage is
# still running (no manifest yet) is known as that stage's.
OWNER_STAMP = ".teranprep-owner.json"
# Folders that hold data other stages read: nothing else is ever written inside them.
_DATA_FOLDERS = {FEATURES, SPLITS, INDEX, EXPORT, SYNTHETIC, RELEVANCE, EVAL}


def folder_format(path: Path) -> str | None:
    """The format of the stage output in `path` (a manifest's `format`, else marker files), or None."""
    path = Path(path)
    for name in ("manifest.json", OWNER_STAMP):
        fmt = _format_in(path / name)
        if fmt:
            return fmt
    for fmt, names in _MARKERS:
        if any((path / name).exists() for name in names):
            return fmt
    return None


def _format_in(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text("utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) and fmt else None


def read_stamped_json(path: Path, fmt: str, *, what: str, missing: str | None, unreadable: str,
                      foreign: str, foreign_hint: str = "") -> dict | None:
    """A stage's JSON file that carries `"format": fmt` (its manifest): the parsed dict, or one
    PrepError line naming `path`. `missing` is the line's tail when the file is absent (None:
    return None instead); a file that is not JSON says "unreadable {what} (...); {unreadable}";
    another format says "{foreign} (format ...)" and "; {foreign_hint}" when given."""
    path = Path(path)
    if not path.is_file():
        if missing is None:
            return None
        raise PrepError(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: unreadable {what} ({exc}); {unreadable}") from exc
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise PrepError(f"{path}: {foreign} (format {found!r})" + (f"; {foreign_hint}" if foreign_hint else ""))
    return data


def describe(fmt: str) -> str:
    return DESCRIPTIONS.get(fmt, f"output of format {fmt!r}")


def claim_output_dir(out: Path, fmt: str, *, create: bool = True, allow_inside=()) -> Path:
    """Checks that `out` may hold this stage's output (format `fmt`) and, with `create`, makes it.

    Refuses (PrepError, nothing touched): `out` is a file; `out` holds another stage's output;
    `out` lies inside another stage's data folder (formats in `allow_inside` are allowed as
    ancestors, e.g. an eval inside its run); `out` cannot be created or written; `out` is a URL
    (only extract-regions writes to one, through its local mirror: manifests/remote.py).
    """
    from .remote import url_of
    if url_of(out):
        raise PrepError(f"{url_of(out)}: this stage writes to a local folder only; pass a local "
                        "path and copy the result up")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out}: is a file, not a folder; pass a folder path as the output")
    if out.is_dir():
        found = folder_format(out)
        if found is not None and found != fmt:
            raise PrepError(f"{out}: holds {describe(found)}; this stage writes {describe(fmt)} and "
                            "never into another stage's folder; choose another output folder")
    for parent in Path(os.path.abspath(out)).parents:
        found = folder_format(parent)
        if found in _DATA_FOLDERS and found != fmt and found not in allow_inside:
            raise PrepError(f"{out}: lies inside {parent}, which holds {describe(found)}; write "
                            "this stage's output to a folder of its own")
    if not create:
        _check_creatable(out)
        if out.is_dir():
            lock_output_dir(out, required=False)
    else:
        ensure_writable_dir(out)
        lock_output_dir(out)  # before anything is planned or written: one writer per folder
        if not (out / OWNER_STAMP).is_file():
            from .atomic import atomic_write_json
            atomic_write_json(out / OWNER_STAMP, {"format": fmt})
    return out


# The lock file every writing stage holds an exclusive flock on. It is created once and never
# written, so a re-run leaves every file of a finished folder untouched.
LOCK_NAME = ".teranprep-lock"
_held_locks: dict[str, int] = {}  # realpath of a folder -> fd of its locked lock file (this process)


def lock_output_dir(out: Path, *, required: bool = True) -> None:
    """Takes an exclusive OS lock (fcntl.flock on out/.teranprep-lock) for this process, held
    until release_output_locks() or the process's death (the kernel drops it then, also on
    SIGKILL). Another live process holding it: one PrepError line naming its pid and command.
    Re-entrant within a process. `required` False: a folder whose lock file cannot be created
    is left unlocked (a check-only claim; the writing claim that follows reports it)."""
    import fcntl
    real = os.path.realpath(out)
    if real in _held_locks:
        return
    path = Path(real) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        if not required:
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise PrepError(f"{out}: another prep run is writing this folder ({holder}); wait for it "
                        "to finish or choose another output folder") from None
    except OSError:
        os.close(fd)
        if not required:
            return
        raise
    _held_locks[real] = fd


def _lock_holder(fd: int) -> str:
    """"pid N: COMMAND" of the process holding the flock on `fd`'s file, from /proc/locks (Linux)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and ident in fields and "->" not in fields:
                pid = fields[fields.index(ident) - 1]
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    command = " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
                except OSError:
                    command = "command unknown"
                return f"pid {pid}: {command}"
    except OSError:
        pass
    return "pid unknown"


def releases_locks(stage):
    """Decorates a stage function: the folder locks it took are dropped when it returns or
    raises, so a library caller (a notebook, `run_demo`, a test) can run `prep` on the same
    folder afterwards. Locks taken before the call (an enclosing stage's) stay held."""
    import functools

    @functools.wraps(stage)
    def run(*args, **kwargs):
        before = set(_held_locks)
        try:
            return stage(*args, **kwargs)
        finally:
            _release([real for real in _held_locks if real not in before])
    return run


def _release(reals) -> None:
    import fcntl
    for real in reals:
        fd = _held_locks.pop(real)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def release_output_locks() -> None:
    """Drops every output-folder lock this process holds (the CLI calls it after each command)."""
    _release(list(_held_locks))


def _check_creatable(out: Path) -> None:
    """Without creating anything: the nearest existing folder of `out` must be writable
    (access() reports a read-only mount as EROFS, for root too)."""
    here = Path(os.path.abspath(out))
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise PrepError(f"{out}: {here} is a file, not a folder; pass another output path")
    if not os.access(here, os.W_OK | os.X_OK):
        raise PrepError(f"{out}: cannot write here ({here} is read-only or not writable); "
                        "choose a writable output folder")


def ensure_writable_dir(out: Path) -> None:
    """Creates `out` (and parents) and proves it writable with a probe file; one line if not."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".teranprep-write-probe-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"probe")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except FileExistsError as exc:
        raise PrepError(f"{exc.filename or out}: a file stands where a folder is needed; pass "
                        "another output path") from exc
    except NotADirectoryError as exc:
        raise PrepError(f"{out}: a part of this path is a file, not a folder; pass another "
                        "output path") from exc
    except OSError as exc:
        raise PrepError(f"{exc.filename or out}: cannot write here ({exc.strerror or exc}); "
                        "choose a writable output folder") from exc

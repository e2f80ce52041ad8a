"""The resumable sharded stage that extract-regions, import-features and index are written on.

A stage gives its items in key order (each with a key and a signature: what, if it changes,
means the item must be computed again), a task per shard, and how to assemble the folder. This
module owns the rest, once for every stage:
- the plan: shards/plan.json keeps each shard's keys, so keys added later go into new shards
  after the last one, a changed item re-runs only its own shard, a removed key re-runs its
  shard (or deletes it when none of its keys is left), and --overwrite re-plans from nothing;
- completion: a shard is complete when its marker (regions-NNNNN.json, written last, after the
  shard file is renamed into place) records this parameter fingerprint, the shard file's size
  and exactly the planned items' signatures;
- the run: stale temporaries removed, the plan written, pending shards run on run_tasks, the
  marker written by `run_shard` in the worker, index + manifest assembled by the stage last;
- the dry-run report: one line per shard saying why it would run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...errors import PrepError
from ...interrupts import resumable
from ...manifests import remote
from ...manifests.atomic import atomic_write_json, canonical_json
from ...manifests.features import SHARDS_DIR, completed_shard, current_manifest
from ...manifests.shards import remove_stale_temps, shard_name
from .distribute import run_tasks

PLAN_NAME = "plan.json"  # shards/plan.json: which keys each shard holds (stable across runs)


@dataclass(frozen=True)
class PlannedItem:
    """One unit of a sharded stage: `key` orders and names it; `signature` (JSON-able) is what
    the shard's marker records for it; `payload` is what the stage's task needs to compute it."""
    key: str
    signature: Any
    payload: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class ShardTask:
    """What every stage's shard task carries; a stage subclasses it and implements `compute`,
    which writes the shard file (atomically) and returns its stats (the marker's content)."""
    index: int
    out: str
    params_fingerprint: str
    # a folder at a URL (manifests/remote.py): `out` is then the driver's local mirror, which a
    # worker never touches; it writes under its own `workdir` (a temp folder) and uploads
    remote: str = ""
    storage: str = ""  # the driver's storage options (JSON), for workers on other machines
    workdir: str = ""

    @property
    def h5_path(self) -> Path:
        return Path(self.workdir or self.out) / SHARDS_DIR / shard_name(self.index)

    @property
    def stats_path(self) -> Path:
        return self.h5_path.with_suffix(".json")

    def compute(self) -> dict:  # pragma: no cover - every stage defines it
        raise NotImplementedError


def run_shard(task: ShardTask) -> dict:
    """Runs one shard task (in a worker or in-process): removes what a killed writer of this
    shard left, computes the shard, then writes the completion marker, last."""
    if task.storage:
        remote.set_storage_options(task.storage)
    if task.remote and not task.workdir:
        return _run_remote_shard(task)
    for stale in task.h5_path.parent.glob(f".{task.h5_path.stem}.*"):
        stale.unlink(missing_ok=True)
    task.stats_path.unlink(missing_ok=True)  # a marker of another plan must not survive a rewrite
    stats = task.compute()
    if stats.get("params_fingerprint", task.params_fingerprint) != task.params_fingerprint:
        raise RuntimeError(f"{task.h5_path}: computed with fingerprint {stats['params_fingerprint']}, "
                           f"planned {task.params_fingerprint}")
    stats["params_fingerprint"] = task.params_fingerprint
    atomic_write_json(task.stats_path, stats)
    return stats


def _run_remote_shard(task: ShardTask) -> dict:
    """The shard of a folder at a URL: the marker object removed first (a rewrite must not keep
    an old one), the shard computed in this worker's temp space, uploaded as one object, then its
    marker uploaded (with the object's size and ETag). A worker that dies before the marker leaves
    no marker, so the shard re-runs; a marker is written only after its shard object is whole."""
    import tempfile
    from dataclasses import replace
    name = shard_name(task.index)
    shard_url = remote.join(task.remote, SHARDS_DIR, name)
    marker_url = shard_url[:-len(".h5")] + ".json"
    remote.remove(marker_url)
    with tempfile.TemporaryDirectory(prefix="prep-shard-") as tmp:
        local = replace(task, workdir=tmp)
        stats = run_shard(local)
        try:
            remote.put_file(local.h5_path, shard_url)
            stored = remote.info(shard_url)
            if stored["size"] != stats.get("bytes", stored["size"]):
                raise RuntimeError(f"{shard_url}: {stored['size']} bytes stored, {stats['bytes']} written")
            stats["object"] = {"url": shard_url, "etag": stored["etag"], "size": stored["size"]}
            remote.put_bytes(marker_url, canonical_json(stats))
        except (PrepError, FileNotFoundError) as exc:
            # a failed upload may be the network's passing fault: run_tasks tries the shard again
            # (a PrepError would stop the stage at once); its last failure is the stage's one line
            raise RuntimeError(str(exc)) from exc
    return stats


# ---------------------------------------------------------------- the plan

@dataclass
class ShardPlan:
    shards: list  # [(index, [PlannedItem, ...])], ascending index
    next_index: int
    emptied: list  # indices of earlier shards none of whose keys is in the input any more
    new_indices: set = field(default_factory=set)


def plan_shards(items: list, shard_size: int, earlier: dict | None) -> ShardPlan:
    """Shards keep the keys an earlier plan gave them (minus removed ones); items no shard holds
    go, in key order, into new shards of up to `shard_size` after the last index."""
    earlier = earlier or {"shards": {}, "next_index": 0}
    by_key = {item.key: item for item in items}
    shards, emptied, assigned = [], [], set()
    for index in sorted(earlier["shards"]):
        keys = earlier["shards"][index]
        assigned.update(keys)
        members = [by_key[k] for k in keys if k in by_key]
        (shards.append((index, members)) if members else emptied.append(index))
    fresh = [item for item in items if item.key not in assigned]
    next_index = earlier["next_index"]
    new_indices = set()
    for s in range(0, len(fresh), shard_size):
        shards.append((next_index, fresh[s:s + shard_size]))
        new_indices.add(next_index)
        next_index += 1
    return ShardPlan(shards, next_index, emptied, new_indices)


def previous_plan(out: Path, params_fp: str) -> dict | None:
    """The membership of every earlier shard: shards/plan.json, else (outputs written before the
    plan file existed) the completed shards' markers; None for a fresh folder."""
    shards_dir = Path(out) / SHARDS_DIR
    try:
        data = json.loads((shards_dir / PLAN_NAME).read_text("utf-8"))
        if data.get("params_fingerprint") == params_fp:
            return {"shards": {int(k): list(v) for k, v in data["shards"].items()},
                    "next_index": int(data["next_index"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    found = {}
    for path in sorted(shards_dir.glob("regions-*.json")) if shards_dir.is_dir() else []:
        try:
            stats = json.loads(path.read_text("utf-8"))
            index = int(path.stem.split("-")[1])
        except (OSError, ValueError, IndexError):
            continue
        if stats.get("params_fingerprint") == params_fp:
            found[index] = [r["image_key"] for r in stats.get("rows", [])]
    if not found:
        return None
    return {"shards": found, "next_index": max(found) + 1}


def write_plan(out: Path, plan: ShardPlan, params_fp: str) -> None:
    atomic_write_json(Path(out) / SHARDS_DIR / PLAN_NAME, {
        "params_fingerprint": params_fp, "next_index": plan.next_index,
        "shards": {str(i): [item.key for item in members] for i, members in plan.shards}})


def listing_digest(items: list) -> str:
    """sha256 of every (key, signature): a finished folder is current only for the same listing."""
    text = json.dumps([[item.key, item.signature] for item in items], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- one stage's run

@dataclass
class ShardedStage:
    """A stage's plan over `items` (sorted by key) in `out`, and its tasks.

    `make_task(index, members)` builds the stage's ShardTask; `recorded(stats)` reads back from a
    marker the [(key, signature)] it was computed for (how each stage's marker stores them).
    """
    name: str
    out: Path
    items: list
    shard_size: int
    params_fingerprint: str
    make_task: Callable
    recorded: Callable
    noun: str = "images"
    listing: str = ""
    # recheck(task, stats) -> how many of a complete shard's items changed in content although
    # their signatures did not (extract's --verify-inputs: sha256 of the bytes); those shards run
    recheck: Callable | None = None
    # the folder at a URL (manifests.remote.RemoteFolder, pulled): `out` is its local mirror,
    # which holds the markers and plan but no shard; shard sizes come from the object listing
    remote: Any = None

    def __post_init__(self):
        self.out = Path(self.out)
        self.listing = self.listing or listing_digest(self.items)
        self.plan = plan_shards(self.items, self.shard_size, previous_plan(self.out, self.params_fingerprint))
        self.tasks = [self.make_task(index, members) for index, members in self.plan.shards]
        self.members = dict(self.plan.shards)
        self.done = {t.index: stats for t in self.tasks if (stats := self.completed(t)) is not None}
        self.content_changed = {}
        if self.recheck is not None:
            for t in self.tasks:
                if t.index in self.done and (changed := self.recheck(t, self.done[t.index])):
                    self.content_changed[t.index] = changed
                    del self.done[t.index]
        self.pending = [t for t in self.tasks if t.index not in self.done]

    def completed(self, task) -> dict | None:
        planned = [[item.key, item.signature] for item in self.members[task.index]]
        size = None
        if self.remote is not None:
            size = self.remote.sizes(SHARDS_DIR).get(task.h5_path.name, -1)
        return completed_shard(task.h5_path, self.params_fingerprint,
                               lambda stats: _jsonish(self.recorded(stats)) == _jsonish(planned), size=size)

    def current_manifest(self) -> dict | None:
        """The folder's manifest when nothing is pending and it was assembled from this listing."""
        return None if self.pending else current_manifest(self.out, self.params_fingerprint, self.listing)

    # -------------------------------------------------------- the dry-run report
    def why(self, task) -> str:
        """Why a shard would run (or "complete")."""
        if task.index in self.done:
            return "complete"
        if task.index in self.content_changed:
            return f"{self.content_changed[task.index]} changed content (sha256)"
        if task.index in self.plan.new_indices:
            return f"new {self.noun}"
        try:
            stats = json.loads(task.stats_path.read_text("utf-8"))
            before = {key: _jsonish(sig) for key, sig in self.recorded(stats)}
        except (OSError, ValueError, TypeError, KeyError):
            return "not run yet (or interrupted)"
        now = {item.key: _jsonish(item.signature) for item in self.members[task.index]}
        removed = len(set(before) - set(now))
        changed = sum(1 for k, v in now.items() if k in before and before[k] != v)
        parts = [f"{changed} changed" if changed else "", f"{removed} removed" if removed else ""]
        return ", ".join(p for p in parts if p) or "parameters changed"

    def report(self) -> list[dict]:
        """One entry per planned shard (and per shard to delete): the dry run's content."""
        rows = []
        for t in self.tasks:
            members = self.members[t.index]
            rows.append({"shard": t.h5_path.name, "n": len(members), "first": members[0].key,
                         "last": members[-1].key, "state": self.why(t)})
        for index in self.plan.emptied:
            rows.append({"shard": shard_name(index), "n": 0, "first": "", "last": "",
                         "state": "to delete"})
        return rows

    def report_lines(self) -> list[str]:
        lines = [f"dry run: {len(self.items)} {self.noun} -> {len(self.tasks)} shards of up to "
                 f"{self.shard_size} {self.noun} in {remote.location(self.out)}/{SHARDS_DIR}; {len(self.done)} "
                 f"complete, {len(self.pending)} to run"]
        for r in self.report():
            if r["n"]:
                lines.append(f"  {r['shard']}  {r['n']:6d} {self.noun}  {r['first']} .. {r['last']}  "
                             f"[{r['state']}]")
            else:
                lines.append(f"  {r['shard']}  every {self.noun[:-1] if self.noun.endswith('s') else self.noun} "
                             f"removed from the input  [to delete]")
        return lines

    # -------------------------------------------------------- the run
    def prepare(self) -> None:
        """Before any task: temporaries of killed writers gone, the plan on disk, shards that
        left the plan deleted (with their markers)."""
        shards_dir = self.out / SHARDS_DIR
        shards_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(shards_dir)
        remove_stale_temps(self.out)
        write_plan(self.out, self.plan, self.params_fingerprint)
        planned = {t.h5_path.stem for t in self.tasks}
        for path in shards_dir.glob("regions-*"):
            if path.name != PLAN_NAME and path.stem not in planned:
                path.unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.push(f"{SHARDS_DIR}/{PLAN_NAME}")
            for name in sorted(self.remote.sizes(SHARDS_DIR)):
                if name.startswith("regions-") and Path(name).stem not in planned:
                    self.remote.remove(f"{SHARDS_DIR}/{name}")

    def run(self, *, workers: int = 0, scheduler: str | None = None, retries: int = 2,
            on_result=None, on_progress=None) -> dict:
        """Runs the pending shards; returns every shard's stats by index (interrupts keep the
        completed shards and say so in one line)."""
        self.prepare()

        def kept():  # read off the disk: a worker may have finished a shard the driver has not heard of
            complete = sum(self.completed(t) is not None for t in self.tasks)
            where = remote.location(self.out)  # a folder at a URL: its URL, not the local mirror
            if self.remote is not None:
                try:
                    self.remote.objects = remote.listing(self.remote.url)
                    complete = sum(f"{t.stats_path.name}" in self.remote.sizes(SHARDS_DIR) for t in self.tasks)
                except Exception:  # noqa: BLE001 - an interrupt's message must not fail
                    pass
            return (f"{complete} of {len(self.tasks)} shards complete in {where} (kept; the "
                    "index and manifest are written when every shard is)")

        with resumable(kept):
            results = run_tasks(run_shard, self.pending, workers=workers, scheduler=scheduler,
                                retries=retries, on_result=on_result, on_progress=on_progress)
        for task, stats in zip(self.pending, results):
            self.done[task.index] = stats
        return self.done

    def ordered_stats(self) -> list[dict]:
        return [self.done[t.index] for t in self.tasks]


def _jsonish(value):
    """Tuples and lists compare equal once both went through JSON (markers are JSON)."""
    return json.loads(json.dumps(value))

"""Running independent tasks: in this process, on a local dask cluster, or on a remote scheduler.

Every backend has the same signature and the same retry rule, so a stage never knows which one
ran its tasks. Tasks are plain picklable objects; workers build heavy things (models) themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
import warnings
from typing import Callable, Iterable

from ...errors import USER_FS_ERRNOS, PrepError, os_error_line


PROGRESS_TOPIC = "teranprep-progress"
_FLUSH_KEY = "teranprep-progress-flush"  # run_tasks' own last event (see _run_dask)
_inline_progress: list = []  # the handler of the in-process run, when one is running


def report_progress(payload: dict) -> None:
    """Called by a task while it runs; reaches run_tasks' `on_progress` in the driver.

    In a dask worker it travels as a structured event (Worker.log_event) that the driver's client
    subscribes to; in-process it is a direct call. Outside run_tasks it does nothing.
    """
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        worker.log_event(PROGRESS_TOPIC, payload)
    else:
        from ...interrupts import check_interrupted
        check_interrupted()  # in-process: between items is where a dropped signal is raised again
        if _inline_progress:
            _inline_progress[-1](payload)


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(workers: int, n_tasks: int, scheduler: str | None = None) -> int:
    """torch threads per task when the user sets none: this machine's cores shared by the tasks
    that can run at once (min(workers, tasks); --workers 0 runs one at a time), at least 1. A
    function of the core count and the plan only, fixed before any task runs, so every task of
    a run uses the same count. On a remote scheduler this machine's cores say nothing: 1."""
    if scheduler is not None:
        return 1
    concurrent = max(1, min(max(workers, 1), n_tasks))
    return max(1, machine_cores() // concurrent)


def check_workers(workers: int | None, scheduler: str | None, default: int) -> int:
    """--workers for a stage: refused with --scheduler (whose cluster decides how many tasks run
    at once; before, the option was dropped without a word), else the default when not given."""
    if scheduler is not None and workers is not None:
        raise PrepError(f"--workers {workers} and --scheduler {scheduler} do not combine: the "
                        "scheduler's workers run the tasks; drop --workers (or --scheduler)")
    workers = default if workers is None else int(workers)
    if workers < 0:
        raise PrepError("--workers must be >= 0")
    return workers


def _worker_environment() -> dict:
    import torch
    return {"cuda": bool(torch.cuda.is_available()), "threads": int(torch.get_num_threads())}


def worker_environment(scheduler: str) -> dict:
    """What the scheduler's workers report (CUDA on every one of them, their torch threads),
    asked once before a stage plans, so the fingerprint records their device, not the driver's."""
    from dask.distributed import Client
    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        client = Client(scheduler, timeout="10s")
    except OSError as exc:
        raise PrepError(f"cannot reach the dask scheduler at {scheduler} ({exc}); start one "
                        "with `dask scheduler` or drop --scheduler") from exc
    try:
        answers = client.run(_worker_environment)
    finally:
        _close_quietly(client, None, False)
    if not answers:
        raise PrepError(f"the dask scheduler at {scheduler} has no workers; start some with "
                        f"`dask worker {scheduler}`")
    return {"cuda": all(a["cuda"] for a in answers.values()),
            "threads": sorted({a["threads"] for a in answers.values()}), "workers": len(answers)}


def stage_device(device: str, scheduler: str | None = None) -> str:
    """The one `--device` rule of every stage (teranprep.devices.resolve_device), applied to the
    machine that runs the tasks: this one, or the scheduler's workers."""
    from ...devices import resolve_device
    if scheduler is None:
        return resolve_device(device)
    if device == "cpu":  # nothing to ask
        return "cpu"
    env = worker_environment(scheduler)
    return resolve_device(device, cuda_available=env["cuda"], where=f" on the workers of {scheduler}")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc (for mallopt and malloc_trim), loaded once; None where the C library is another."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_buffers() -> dict | None:
    """Makes glibc keep every freed buffer in the heap for the next one, for a process that runs
    the same large tensor shapes over and over (a training loop) and can hold its peak memory.

    glibc serves each allocation above 32 MiB (its highest mmap threshold) with a fresh mmap and
    unmaps it on free: a teran_coco step allocates tens of such activations and gradients, and
    the kernel zero-fills them page by page on every step. With mmap off (M_MMAP_MAX 0) and
    trimming off (M_TRIM_THRESHOLD -1, see mallopt(3)), they come from the heap and are reused;
    the process stays at its peak RSS. Returns the settings made, or None where malloc is not
    glibc's, TERANPREP_MALLOC=default asks for glibc's defaults, or the user set MALLOC_* /
    GLIBC_TUNABLES malloc settings, which are then left alone.
    """
    if (os.environ.get("TERANPREP_MALLOC") == "default" or any(k in os.environ for k in _MALLOC_ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return None
    libc = _glibc()
    if libc is None or not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        return None
    return {"allocator": "glibc", "mmap_max": 0, "trim_threshold": -1}


def tune_malloc_for_tensors() -> None:
    """Undoes, inside a worker, the malloc settings that dask's nanny puts in its environment.

    dask starts workers with MALLOC_TRIM_THRESHOLD_=65536; setting it at all fixes glibc's mmap
    threshold at 128 KiB, so every tensor buffer is mmap'd, faulted in and unmapped again (7x the
    page faults, 2x the detector time measured here). Raising both thresholds restores reuse.
    Applies to workers of any cluster (`dask worker` on other machines included); no-op off glibc.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or getattr(tune_malloc_for_tensors, "done", False):
        return
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    tune_malloc_for_tensors.done = True


def return_free_memory() -> None:
    """Hands the C heap's free pages back to the system (glibc malloc_trim; no-op elsewhere).
    Freed tensor buffers below the mmap threshold stay in the process's heap, counted in its
    RSS: after eval encodes a split's images and drops the image side, ~0.5 GB at teran_coco's
    size, which the big buffers that follow (the regions, the score matrix) do not reuse."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def run_tasks(fn: Callable, tasks: Iterable, *, workers: int = 1, scheduler: str | None = None,
              retries: int = 2, on_result: Callable | None = None,
              on_progress: Callable | None = None) -> list:
    """Runs fn(task) for every task; returns results in task order.

    workers == 0 runs in this process (no dask); otherwise a dask LocalCluster of `workers`
    single-threaded processes, or the cluster at `scheduler` (tcp://host:port) when given.
    A task that raises is retried `retries` times; a task that still fails raises PrepError. A
    task that raises PrepError (a deterministic, user-fixable problem) is never retried.
    `on_progress(payload)` receives what tasks pass to report_progress while they run.
    """
    tasks = list(tasks)
    if not tasks:
        return []
    if scheduler is None and workers == 0:
        _inline_progress.append(on_progress or (lambda payload: None))
        try:
            return _run_inline(fn, tasks, retries, on_result)
        finally:
            _inline_progress.pop()
    return _run_dask(fn, tasks, workers, scheduler, retries, on_result, on_progress)


def failure_line(task, attempts: int, exc: BaseException) -> str:
    """One line for a task that kept failing: its first message line, never a traceback."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    plural = "s" if attempts != 1 else ""
    return f"task {task!r} failed after {attempts} attempt{plural}: {type(exc).__name__}: {text}"


def _raise_if_user_fs_error(exc: BaseException) -> None:
    """A full disk, a read-only mount or a permission: retrying cannot help; one line, now."""
    if not isinstance(exc, OSError):
        return
    if exc.errno in USER_FS_ERRNOS:
        raise PrepError(os_error_line(exc)) from exc
    text = str(exc)
    if "No space left on device" in text or "errno = 28" in text:  # HDF5 reports it in words
        raise PrepError("no space left on device while writing an output file; free some space "
                        "(completed work was kept) and run the command again") from exc


def _run_inline(fn, tasks, retries, on_result):
    results = []
    for task in tasks:
        for attempt in range(retries + 1):
            try:
                result = fn(task)
                break
            except PrepError:  # deterministic (a wrong file, a bad option): never retried
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then reported
                _raise_if_user_fs_error(exc)
                if attempt == retries:
                    raise PrepError(failure_line(task, retries + 1, exc)) from exc
        results.append(result)
        if on_result:
            on_result(result)
    return results


def _run_dask(fn, tasks, workers, scheduler, retries, on_result, on_progress):
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    from ...interrupts import signals_ignored_in_children

    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None
    if scheduler is None:
        # Our own workers start without dask's MALLOC_TRIM_THRESHOLD_ (see tune_malloc_for_tensors),
        # and with SIGINT ignored: a Ctrl-C reaches the driver only, which stops them quietly.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                         # the worker's sampling profiler takes the GIL every 10 ms: on a machine
                         # whose every core runs the task's threads, that preempts them for a
                         # report nobody reads here
                         "distributed.worker.profile.enabled": False})
        with signals_ignored_in_children(), warnings.catch_warnings():
            # Its HTTP endpoint moves off a busy port 8787 with a warning no user needs to read.
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise PrepError(f"cannot reach the dask scheduler at {scheduler} ({exc}); start one "
                            "with `dask scheduler` or drop --scheduler") from exc
    flushed = threading.Event()
    flush_token = uuid.uuid4().hex

    def deliver(event):
        payload = event[1]
        if isinstance(payload, dict) and payload.get(_FLUSH_KEY) == flush_token:
            flushed.set()
        else:
            on_progress(payload)

    try:
        if on_progress is not None:
            client.subscribe_topic(PROGRESS_TOPIC, deliver)
        run_id = f"teranprep-{uuid.uuid4().hex[:8]}"
        # Retries are ours, not dask's: a deterministic error (PrepError: a wrong weights file, a
        # bad option) fails the stage at once as its one line; anything else is tried again.
        attempts = [1] * len(tasks)
        futures = [client.submit(fn, task, pure=False, key=f"{run_id}-{i}-1")
                   for i, task in enumerate(tasks)]
        position = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(tasks)
        pending = as_completed(futures)
        for future in pending:
            i = position[future.key]
            try:
                results[i] = future.result()
            except PrepError:
                raise
            except Exception as exc:  # noqa: BLE001
                _raise_if_user_fs_error(exc)
                if attempts[i] > retries:
                    raise PrepError(failure_line(tasks[i], attempts[i], exc)) from exc
                attempts[i] += 1
                again = client.submit(fn, tasks[i], pure=False, key=f"{run_id}-{i}-{attempts[i]}")
                position[again.key] = i
                pending.add(again)
                continue
            if on_result:
                on_result(results[i])
        if on_progress is not None:
            # Events reach us asynchronously: one of our own, published after the last task
            # finished, arrives after every event a task sent, so none is lost or late.
            client.log_event(PROGRESS_TOPIC, {_FLUSH_KEY: flush_token})
            flushed.wait(timeout=30)
        return results
    finally:
        _close_quietly(client, cluster, on_progress is not None)


def _close_quietly(client, cluster, subscribed):
    """Shuts the client and our cluster down without a word, also while an interrupt unwinds."""
    quiet = logging.getLogger("distributed")
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        if subscribed:
            client.unsubscribe_topic(PROGRESS_TOPIC)
        client.close(timeout=10)
        if cluster is not None:
            cluster.close(timeout=10)
    except Exception:  # noqa: BLE001 - best effort: the stage's own outcome is what matters
        pass
    finally:
        quiet.setLevel(logging.ERROR)

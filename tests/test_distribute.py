"""run_tasks: the same results, retries and progress events in-process and on a real dask cluster."""

from pathlib import Path

import pytest

from teranprep.errors import PrepError
from teranprep.pipeline.common.distribute import report_progress, run_tasks


def square_reporting(task):
    n, flag_dir = task
    for step in (1, 2):
        report_progress({"task": n, "step": step})
    if flag_dir is not None:  # fail on the first attempt only: the marker file survives the retry
        marker = Path(flag_dir) / f"attempted-{n}"
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError(f"transient failure of task {n}")
    return n * n


def always_fails(task):
    raise ValueError(f"bad task {task}")


@pytest.mark.parametrize("workers", [0, 2])
def test_results_in_order_with_retries_and_progress(workers, tmp_path):
    events, finished = [], []
    tasks = [(n, str(tmp_path)) for n in range(5)]
    results = run_tasks(square_reporting, tasks, workers=workers, retries=1,
                        on_result=finished.append, on_progress=events.append)
    assert results == [0, 1, 4, 9, 16]
    assert sorted(finished) == [0, 1, 4, 9, 16]
    # each attempt reports twice; every task ran twice (the first attempt failed)
    expected = sorted([(n, s) for n in range(5) for s in (1, 2)] * 2)
    # every event of every attempt, exactly once, and all of them before run_tasks returns
    # (through dask they travel via the scheduler: run_tasks waits for the last one)
    assert sorted((e["task"], e["step"]) for e in events) == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_a_task_failing_every_retry_is_one_clear_error(workers):
    with pytest.raises(PrepError, match="failed after 2 attempts: ValueError: bad task 3"):
        run_tasks(always_fails, [3], workers=workers, retries=1)


_FAULTS = """
import json, resource, sys
import numpy as np
from teranprep.pipeline.common import distribute
mode, mib, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
made = None
if mode == "tuned":
    distribute.tune_malloc_for_tensors()
elif mode == "keep":
    made = distribute.keep_freed_buffers()
np.ones(mib << 17)  # warm-up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(count):
    a = np.ones(mib << 17)  # mib MiB of float64, freed each time
    address = a.ctypes.data
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
in_heap = any(int(lo, 16) <= address < int(hi, 16) for lo, hi in heap)
print(json.dumps([faults, made, in_heap]))
"""


def _faults(mode, mib, count, **env):
    """(minor page faults of `count` mib-MiB buffers, what keep_freed_buffers returned, whether the
    last buffer lay in the [heap] mapping rather than a mapping of its own) in a fresh Python with
    `mode` (plain | tuned | keep) applied, under env without the caller's malloc settings."""
    import json
    import os
    import subprocess
    import sys
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "TERANPREP_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode, str(mib), str(count)],
                         env=dict(clean, **env), check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_dask_malloc_environment_is_undone_so_buffers_are_reused():
    """dask's MALLOC_TRIM_THRESHOLD_ makes every large buffer a fresh mmap, faulted in again on
    each use (about 500 faults per 8 MiB array here). After tune_malloc_for_tensors the heap keeps
    and reuses them."""
    faults = {mode: _faults(mode, 8, 100, MALLOC_TRIM_THRESHOLD_="65536")[0] for mode in ("plain", "tuned")}
    if faults["plain"] < 100 * 100:  # the kernel sometimes maps these without faulting each page
        pytest.skip(f"only {faults['plain']} page faults without tuning: nothing to compare")
    assert faults["tuned"] < faults["plain"] / 20


def test_keep_freed_buffers_reuses_buffers_above_the_mmap_threshold():
    """A 64 MiB buffer freed and asked for again: glibc maps and faults in a fresh one each time
    (~540 faults per buffer on this kernel, which faults some runs of pages in at once); after
    keep_freed_buffers the heap hands the same, already present pages back (0 faults here)."""
    plain, _, plain_in_heap = _faults("plain", 64, 20)  # 64 MiB: above glibc's highest mmap threshold
    kept, made, kept_in_heap = _faults("keep", 64, 20)
    assert made == {"allocator": "glibc", "mmap_max": 0, "trim_threshold": -1}
    assert not plain_in_heap and kept_in_heap
    if plain < 20 * 100:  # huge pages: the kernel faulted 2 MiB at a time, nothing to compare
        pytest.skip(f"only {plain} page faults without the setting: nothing to compare")
    assert kept < plain / 20


@pytest.mark.parametrize("env", [{"TERANPREP_MALLOC": "default"}, {"MALLOC_MMAP_MAX_": "65536"},
                                 {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_keep_freed_buffers_leaves_a_users_malloc_settings_alone(env):
    """Under the user's settings each 64 MiB buffer is still a mapping of its own. (Where it lies
    is the check: how many pages the kernel faults into a fresh mapping varies, 660 to 10,880.)"""
    _, made, in_heap = _faults("keep", 64, 20, **env)
    assert made is None and not in_heap

"""run_tasks: the same results, retries and progress events in-process and on a real dask cluster."""

from pathlib import Path

import pytest

from teranprep.errors import PrepError
from teranprep.pipeline.distribute import report_progress, run_tasks


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
    got = sorted((e["task"], e["step"]) for e in events)
    if workers == 0:
        assert got == expected
    else:  # events travel through the scheduler; the last may land after the results
        assert got and set(got) <= set(expected)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_task_failing_every_retry_is_one_clear_error(workers):
    with pytest.raises(PrepError, match="failed after 2 attempts: ValueError: bad task 3"):
        run_tasks(always_fails, [3], workers=workers, retries=1)

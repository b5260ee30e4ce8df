"""Time limits, as Celery's: the soft one raises SoftTimeLimitExceeded in the task, the hard one stops it and fails
it with TimeLimitExceeded (not retried)."""

import time

import pytest

from broker_client import SoftTimeLimitExceeded, TimeLimitExceeded


def test_the_soft_time_limit_is_raised_in_the_task_which_cleans_up(tasks, worker):
    started = time.monotonic()
    assert tasks.soft_limited.delay(30).get(timeout=20) == "cleaned up"
    assert time.monotonic() - started < 10  # soft_time_limit=0.5, not the 30 s the task would nap


def test_the_soft_time_limit_of_an_async_task_cancels_it_where_it_waits(tasks, worker):
    started = time.monotonic()
    assert tasks.async_soft_limited.delay(30).get(timeout=20) == "cleaned up"
    assert time.monotonic() - started < 10
    assert tasks.async_add.delay(1, 2).get(timeout=20) == 3  # the loop is clean for the next task


def test_an_uncaught_soft_time_limit_fails_the_task(tasks, worker):
    result = tasks.soft_limited.delay(30, "raise")
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=20)
    assert result.info_raw["attempts"] == 1  # like any exception: not retried without autoretry_for


def test_the_hard_time_limit_kills_the_child_and_the_worker_goes_on(tasks, start_worker, queue_name):
    worker = start_worker([queue_name], concurrency=1)
    started = time.monotonic()
    result = tasks.overruns.apply_async((10,), queue=queue_name)
    after = tasks.add.apply_async((2, 3), queue=queue_name)
    with pytest.raises(TimeLimitExceeded, match="time limit"):
        result.get(timeout=20)
    assert time.monotonic() - started < 5  # time_limit=1, not the 10 s the task sleeps
    info = result.info_raw
    assert info["state"] == "FAILURE" and info["attempts"] == 1, info  # not retried
    assert info["error"]["type"] == "TimeLimitExceeded"
    assert after.get(timeout=20) == 5  # on a new child
    assert "WorkerLostError" not in worker.output()


def test_the_workers_time_limits_apply_to_tasks_without_their_own_in_the_threads_pool(tasks, start_worker,
                                                                                      queue_name):
    start_worker([queue_name], concurrency=2, pool="threads", extra=["--soft-time-limit", "0.3", "--time-limit", "1"])
    assert tasks.naps.apply_async((30,), queue=queue_name).get(timeout=20) == "cleaned up"
    # A task that ignores the soft limit gets the hard one, and fails with it, not retried.
    started = time.monotonic()
    result = tasks.naps.apply_async((30, "ignore"), queue=queue_name)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    assert time.monotonic() - started < 5
    assert result.info_raw["attempts"] == 1
    assert tasks.add.apply_async((1, 1), queue=queue_name).get(timeout=20) == 2

"""Pausing queues and limits held by the daemon for every worker together: set from the client, and declared by
workers for the tasks that carry `rate_limit`/`concurrency_limit`."""

import pathlib

import pytest

from broker_client import BrokerError, TimeoutError
from conftest import poll

#: Starts are timed in the worker, a hand-off after the daemon's lease: this much of the measured gaps may be that.
HANDOFF_SLACK = 0.05


def _queue_stats(tasks, queue_name):
    return next((q for q in tasks.broker.stats()["queues"] if q["name"] == queue_name), None)


def test_a_paused_queue_is_leased_by_no_worker_until_resumed(tasks, start_worker, queue_name):
    assert tasks.broker.pause(queue_name) is False
    assert tasks.broker.pause(queue_name) is True  # pausing twice is no error: it says it was paused
    assert _queue_stats(tasks, queue_name)["paused"] is True
    start_worker([queue_name], concurrency=1)
    result = tasks.add.apply_async((1, 2), queue=queue_name)  # enqueues are still taken
    with pytest.raises(TimeoutError):
        result.get(timeout=1)
    assert result.state == "PENDING"
    assert tasks.broker.resume(queue_name) is True
    assert result.get(timeout=20) == 3
    assert tasks.broker.resume(queue_name) is False
    assert _queue_stats(tasks, queue_name)["paused"] is False


def test_a_queue_concurrency_limit_holds_tasks_back_until_it_is_removed(tasks, start_worker, queue_name, tmp_path):
    tasks.broker.set_limit(queue=queue_name, concurrency=1)
    assert {"scope": "queue", "name": queue_name, "concurrency": 1, "running": 0} in tasks.broker.limits()
    start_worker([queue_name], concurrency=2, prefetch=0)
    gates = [{"started": str(tmp_path / f"started-{i}"), "release": str(tmp_path / "release")} for i in range(2)]
    results = [tasks.block.apply_async((g["started"], g["release"], i), queue=queue_name)
               for i, g in enumerate(gates)]
    poll(lambda: pathlib.Path(gates[0]["started"]).exists(), what="the first task to start")
    limit = next(x for x in tasks.broker.limits() if x["name"] == queue_name)
    assert limit["running"] == 1
    assert results[1].state == "PENDING" and not pathlib.Path(gates[1]["started"]).exists()
    tasks.broker.set_limit(queue=queue_name)  # neither rate nor concurrency: removed
    assert all(x["name"] != queue_name for x in tasks.broker.limits())
    poll(lambda: pathlib.Path(gates[1]["started"]).exists(), what="the second task to start once the limit is gone")
    pathlib.Path(gates[0]["release"]).touch()
    assert [r.get(timeout=20) for r in results] == [0, 1]


def test_set_limit_checks_its_arguments(tasks, daemon):
    with pytest.raises(ValueError, match="task= or queue="):
        tasks.broker.set_limit(rate="1/s")
    with pytest.raises(ValueError, match="task= or queue="):
        tasks.broker.set_limit(task="a", queue="b", rate="1/s")
    with pytest.raises(BrokerError) as refused:
        tasks.broker.set_limit(task="tasks_app.nothing", rate="often")
    assert refused.value.code == "bad_request"


def test_a_tasks_rate_limit_is_declared_by_the_worker_and_holds_its_starts(tasks, start_worker, queue_name):
    start_worker([queue_name], concurrency=4)
    limit = next(x for x in tasks.broker.limits() if x["scope"] == "task" and x["name"] == tasks.stamped.name)
    assert limit["rate"] == "5/s" and "concurrency" not in limit
    starts = sorted(r.get(timeout=30) for r in tasks.stamped.delay_many([()] * 20, queue=queue_name))
    # At most 5 × t + 1 starts in any span of t seconds (the daemon's bucket holds one token), with 4 children
    # idle all along.
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            span = starts[j] - starts[i] + HANDOFF_SLACK
            assert j - i + 1 <= 5 * span + 1, f"{j - i + 1} starts in {starts[j] - starts[i]:.3f}s"
    assert starts[-1] - starts[0] >= 19 / 5 - HANDOFF_SLACK

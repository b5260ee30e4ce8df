"""Worker processes under stress: killed mid-task, stopped with SIGTERM. Nothing is lost."""

import os
import pathlib
import signal

import pytest

from conftest import poll


def _started_pids(gate):
    path = pathlib.Path(gate["started"])
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_killing_a_worker_mid_task_loses_nothing(tasks, start_worker, queue_name, gate):
    first = start_worker([queue_name], concurrency=1)
    result = tasks.block.apply_async((gate["started"], gate["release"], "done"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    # Its lease returns to the queue when the connection drops; a new worker picks the task up again.
    start_worker([queue_name], concurrency=1)
    poll(lambda: len(_started_pids(gate)) == 2, what="the task to start again on the second worker")
    pathlib.Path(gate["release"]).touch()
    assert result.get(timeout=20) == "done"
    assert result.info_raw["attempts"] == 2
    # The first run's child died with its parent instead of finishing unsupervised.
    first_child = _started_pids(gate)[0]
    poll(lambda: not _alive(first_child), what="the killed worker's child to be gone")


def test_sigterm_lets_running_tasks_finish_and_leases_nothing_new(tasks, start_worker, queue_name, gate):
    worker = start_worker([queue_name], concurrency=1)
    running = tasks.block.apply_async((gate["started"], gate["release"], "finished"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    waiting = tasks.add.apply_async((1, 1), queue=queue_name)
    worker.process.send_signal(signal.SIGTERM)
    poll(lambda: "warm shutdown" in worker.output(), what="the worker to log its shutdown")
    pathlib.Path(gate["release"]).touch()
    assert worker.process.wait(timeout=30) == 0
    assert running.get(timeout=5) == "finished"
    assert waiting.state == "PENDING"  # never leased: still there for the next worker
    waiting.revoke()


def _leased(tasks, queue_name):
    queues = tasks.broker.stats()["queues"]
    return next((q["leased"] for q in queues if q["name"] == queue_name), 0)


def test_prefetched_tasks_wait_for_a_child_and_sigterm_releases_them_unrun(tasks, start_worker, queue_name, gate):
    worker = start_worker([queue_name], concurrency=1, prefetch=2)
    running = tasks.block.apply_async((gate["started"], gate["release"], "finished"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    waiting = [tasks.add.apply_async((i, i), queue=queue_name) for i in range(4)]
    # One running and two prefetched: the worker holds three leases, never more; two tasks stay in the queue.
    poll(lambda: _leased(tasks, queue_name) == 3, what="two tasks to be prefetched")
    assert [w.state for w in waiting].count("STARTED") == 2
    worker.process.send_signal(signal.SIGTERM)
    poll(lambda: _leased(tasks, queue_name) == 1, what="the prefetched tasks to be released")
    pathlib.Path(gate["release"]).touch()
    assert worker.process.wait(timeout=30) == 0
    assert running.get(timeout=5) == "finished"
    for w in waiting:
        info = w.info_raw
        assert info["state"] == "PENDING" and info["attempts"] == 0, info  # released unrun, no attempt counted
        w.revoke()


def test_large_tasks_held_by_a_busy_child_never_block_the_worker(tasks, start_worker, queue_name, gate):
    # Three 300 kB tasks handed to a child busy with another are more than its pipe holds: the rest waits in the
    # parent, which keeps leasing, heartbeating and, at SIGTERM, takes them back at once.
    worker = start_worker([queue_name], concurrency=1, prefetch=3)
    running = tasks.block.apply_async((gate["started"], gate["release"], "finished"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    big = "x" * 300_000
    waiting = [tasks.add.apply_async((big, str(i)), queue=queue_name) for i in range(3)]
    poll(lambda: _leased(tasks, queue_name) == 4, what="the large tasks to be prefetched")
    worker.process.send_signal(signal.SIGTERM)
    poll(lambda: _leased(tasks, queue_name) == 1, what="the large tasks to be released", timeout=10)
    pathlib.Path(gate["release"]).touch()
    assert worker.process.wait(timeout=30) == 0
    assert running.get(timeout=5) == "finished"
    for w in waiting:
        info = w.info_raw
        assert info["state"] == "PENDING" and info["attempts"] == 0, info["state"]
        w.revoke()


def test_a_task_revoked_while_prefetched_never_starts(tasks, start_worker, queue_name, gate, tmp_path):
    worker = start_worker([queue_name], concurrency=1, prefetch=1)
    running = tasks.block.apply_async((gate["started"], gate["release"], "finished"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    never = str(tmp_path / "never-started")
    # A short lease, so its heartbeats (a third of it) come while it waits behind the running task.
    waiting = tasks.block.apply_async((never, gate["release"], "ran"), queue=queue_name, lease_timeout=0.3)
    poll(lambda: _leased(tasks, queue_name) == 2, what="the second task to be prefetched")
    waiting.revoke()
    poll(lambda: "revoked: stopping it, or not starting it" in worker.output(), what="a heartbeat to see the revoke")
    pathlib.Path(gate["release"]).touch()
    assert running.get(timeout=20) == "finished"
    poll(lambda: waiting.info_raw["state"] == "REVOKED", what="the revoked task to end REVOKED")
    assert not pathlib.Path(never).exists(), "the revoked task started"


def test_sigterm_past_the_grace_period_releases_the_task(tasks, start_worker, queue_name, gate):
    worker = start_worker([queue_name], concurrency=1, grace=0.3)
    result = tasks.block.apply_async((gate["started"], gate["release"], "late"), queue=queue_name)
    poll(lambda: _started_pids(gate), what="the task to start")
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    info = result.info_raw
    assert info["state"] == "PENDING" and info["attempts"] == 0, info  # released, attempt not counted
    assert "released to its queue" in worker.output()
    pathlib.Path(gate["release"]).touch()
    start_worker([queue_name], concurrency=1)
    assert result.get(timeout=20) == "late"


def test_a_crashing_child_is_replaced_and_its_task_retried(tasks, worker, gate):
    if worker.pool != "prefork":
        pytest.skip("only the prefork pool has children")
    result = tasks.block.delay(gate["started"], gate["release"], "survived")
    pid = poll(lambda: _started_pids(gate), what="the task to start")[0]
    os.kill(pid, signal.SIGKILL)
    poll(lambda: len(_started_pids(gate)) == 2, what="the task to be retried")
    pathlib.Path(gate["release"]).touch()
    assert result.get(timeout=20) == "survived"
    assert result.info_raw["attempts"] == 2
    assert "WorkerLostError" in worker.output()


def test_a_dead_child_gives_back_the_tasks_it_held_unrun(tasks, start_worker, queue_name, gate):
    # Enqueued before the worker starts, so one lease takes all three and the child gets them as one batch.
    running = tasks.block.apply_async((gate["started"], gate["release"], "survived"), queue=queue_name)
    waiting = [tasks.add.apply_async((i, i), queue=queue_name) for i in range(2)]
    worker = start_worker([queue_name], concurrency=1, prefetch=2)
    pid = poll(lambda: _started_pids(gate), what="the task to start")[0]
    assert _leased(tasks, queue_name) == 3
    os.kill(pid, signal.SIGKILL)
    poll(lambda: len(_started_pids(gate)) == 2, what="the running task to be retried")
    assert "not started: the worker process it was handed to died" in worker.output()
    pathlib.Path(gate["release"]).touch()
    assert running.get(timeout=20) == "survived"
    assert running.info_raw["attempts"] == 2
    assert "WorkerLostError" in worker.output()
    for i, w in enumerate(waiting):
        assert w.get(timeout=20) == 2 * i
        assert w.info_raw["attempts"] == 1, w.info_raw  # given back unrun: only the run that succeeded counts


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

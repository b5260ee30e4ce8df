"""The producer API against a real daemon and a real worker: results, failures, retries, revocation."""

import asyncio
import os
import pathlib

import pytest

from broker_client import NotFound, SerializationError, TaskFailed, TaskRevokedError, TimeoutError
from conftest import poll


def test_delay_then_get(tasks, worker):
    result = tasks.add.delay(2, 3)
    assert result.get(timeout=20) == 5
    assert result.state == "SUCCESS"
    assert result.ready() and result.successful() and not result.failed()
    assert result.result == 5


def test_apply_async_options_and_kwargs(tasks, worker):
    result = tasks.add.apply_async(kwargs={"x": "a", "y": "b"}, task_id="chosen-id-1", priority=5)
    assert result.id == "chosen-id-1"
    assert result.get(timeout=20) == "ab"


def test_failure_propagates_type_and_message(tasks, worker):
    result = tasks.fail.delay("value", "the amount must be positive")
    with pytest.raises(ValueError, match="the amount must be positive") as caught:
        result.get(timeout=20)
    assert type(caught.value).__name__ == "ValueError"
    assert isinstance(caught.value, TaskFailed)
    assert "raise ValueError(message)" in caught.value.traceback
    assert result.state == "FAILURE" and result.failed()
    # Like Celery, a plain exception is not retried.
    assert result.info_raw["attempts"] == 1


def test_failure_of_an_app_exception_keeps_its_class(tasks, worker):
    with pytest.raises(tasks.PaymentDeclined, match="card expired") as caught:
        tasks.fail.delay("payment", "card expired").get(timeout=20)
    assert caught.value.type_name == "tasks_app.PaymentDeclined"


def test_get_without_propagate_returns_the_exception(tasks, worker):
    error = tasks.fail.delay("value", "nope").get(timeout=20, propagate=False)
    assert isinstance(error, ValueError) and str(error) == "nope"


def test_retry_with_countdown(tasks, worker):
    result = tasks.flaky.delay(2, 0.05)
    assert result.get(timeout=20) == {"retries": 2, "id": result.id}
    info = result.info_raw
    assert info["attempts"] == 3
    assert info["state"] == "SUCCESS"


def test_retry_stops_when_retries_run_out(tasks, worker):
    result = tasks.always_retries.delay()
    with pytest.raises(KeyError) as caught:
        result.get(timeout=20)
    assert "missing" in str(caught.value)
    assert result.info_raw["attempts"] == 2  # max_retries=1: the first run and one retry


def test_retry_with_a_long_countdown_waits(tasks, worker):
    result = tasks.flaky.delay(1, 3600)
    poll(lambda: result.state == "RETRY", what="the task to be scheduled for retry")
    with pytest.raises(TimeoutError):
        result.get(timeout=0.3)
    assert result.revoke() == "REVOKED"


def test_autoretry_for_with_backoff(tasks, worker, tmp_path):
    counter = tmp_path / "attempts"
    result = tasks.autoretried.delay(str(counter))
    with pytest.raises(ConnectionError, match="upstream down"):
        result.get(timeout=20)
    assert counter.read_text() == "xxx"  # max_retries=2: three attempts
    assert result.info_raw["attempts"] == 3


def test_revoke_before_it_runs(tasks, worker):
    result = tasks.add.apply_async((1, 1), countdown=3600)
    assert result.state == "SCHEDULED"
    assert result.revoke() == "REVOKED"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)


def test_revoke_while_running_stops_the_task(tasks, worker, gate):
    result = tasks.block.delay(gate["started"], gate["release"])
    pid = int(poll(lambda: os.path.exists(gate["started"]) and pathlib.Path(gate["started"]).read_text(),
                   what="the task to start"))
    assert result.revoke() == "STARTED"
    if worker.pool != "prefork":
        # A thread cannot be stopped: the task ends REVOKED once it returns, its result discarded.
        poll(lambda: f"[{result.id}] revoked" in worker.output(), what="a heartbeat to see the revoke")
        pathlib.Path(gate["release"]).touch()
        with pytest.raises(TaskRevokedError):
            result.get(timeout=20)
        assert tasks.add.delay(1, 2).get(timeout=20) == 3
        return
    with pytest.raises(TaskRevokedError):
        result.get(timeout=20)
    # The child that ran it was stopped (its heartbeat learned of the revoke), not left running.
    poll(lambda: not _alive(pid), what="the revoked task's process to stop")
    # The worker replaced that child and still runs tasks.
    assert tasks.add.delay(1, 2).get(timeout=20) == 3


def test_unknown_task_id_is_not_found(tasks, daemon):
    with pytest.raises(NotFound) as caught:
        tasks.broker.AsyncResult("no-such-task").state
    assert caught.value.code == "not_found"


def test_unregistered_task_fails_clearly(tasks, worker):
    result = tasks.broker.send_task("nobody.defines.this", queue=tasks.QUEUE)
    with pytest.raises(TaskFailed, match="not registered"):
        result.get(timeout=20)


def test_wrong_arguments_fail_at_delay(tasks):
    with pytest.raises(TypeError, match="tasks_app.add"):
        tasks.add.delay(1, 2, 3)


def test_calling_a_task_runs_it_here(tasks):
    assert tasks.add(2, 2) == 4


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is not running code.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_delay_many_enqueues_in_batches_and_keeps_the_order(tasks, worker):
    items = [(i, i) for i in range(2500)] + [{"x": 1, "y": 2}]
    results = tasks.add.delay_many(items)
    assert len(results) == len(items)
    assert [r.get(timeout=30) for r in results[-3:]] == [2 * 2498, 2 * 2499, 3]
    assert results[0].get(timeout=30) == 0


def test_delay_many_checks_every_item_before_sending_any(tasks, daemon):
    before = tasks.broker.stats()["totals"]["enqueued"]
    with pytest.raises(SerializationError):
        tasks.add.delay_many([(1, 2), (object(), 3)])
    with pytest.raises(TypeError):
        tasks.add.delay_many([(1, 2), (1, 2, 3)])
    assert tasks.broker.stats()["totals"]["enqueued"] == before


def test_an_async_def_task_runs_on_the_workers_event_loop(tasks, worker):
    assert [tasks.async_add.delay(i, 1).get(timeout=20) for i in range(3)] == [1, 2, 3]


def test_the_async_client_api_enqueues_and_waits_without_blocking_the_loop(tasks, worker):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        beat = asyncio.create_task(ticker())
        results = [await tasks.add.delay_async(i, i) for i in range(5)]
        values = await asyncio.gather(*(r.aget(timeout=20) for r in results))
        idle = tasks.add.apply_async((1, 1), queue="nobody-consumes-this")
        with pytest.raises(TimeoutError):
            await idle.aget(timeout=0.3)
        beat.cancel()
        idle.revoke()
        return values, ticks

    values, ticks = asyncio.run(main())
    assert values == [0, 2, 4, 6, 8]
    assert ticks > 10, "the event loop kept running while the calls waited"

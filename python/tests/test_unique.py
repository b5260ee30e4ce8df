"""Unique tasks: while a task holds its unique key, enqueueing another with that key returns the holder."""

import pathlib
import time
import uuid

import pytest

from conftest import poll


def test_a_key_from_the_decorator_is_held_until_the_task_finishes(tasks, worker, gate, tmp_path):
    account = uuid.uuid4().hex
    first = tasks.sync_account.delay(account, gate["started"], gate["release"])
    poll(lambda: pathlib.Path(gate["started"]).exists(), what="the task to start")
    again = tasks.sync_account.delay(account, str(tmp_path / "never"), gate["release"])
    assert again.id == first.id  # the holder, running: nothing new was enqueued
    other = tasks.sync_account.delay(uuid.uuid4().hex, str(tmp_path / "other"), gate["release"])
    assert other.id != first.id  # the key is the account's
    pathlib.Path(gate["release"]).touch()
    assert first.get(timeout=20) == account
    assert other.get(timeout=20) != account
    assert not (tmp_path / "never").exists()
    after = tasks.sync_account.delay(account, str(tmp_path / "after"), gate["release"])
    assert after.id != first.id  # the key was let go when the holder finished
    assert after.get(timeout=20) == account


def test_a_key_held_for_a_window_outlives_the_task(tasks, worker):
    key = f"window:{uuid.uuid4().hex}"
    enqueued = time.monotonic()
    first = tasks.add.apply_async((1, 2), unique_key=key, unique_for=1.5)
    assert first.get(timeout=20) == 3
    finished = tasks.add.apply_async((5, 5), unique_key=key, unique_for=1.5)
    assert finished.id == first.id  # finished, but the key is held for 1.5 s from the enqueue
    assert finished.get(timeout=5) == 3
    time.sleep(max(0.0, enqueued + 1.7 - time.monotonic()))
    later = tasks.add.apply_async((5, 5), unique_key=key, unique_for=1.5)
    assert later.id != first.id
    assert later.get(timeout=20) == 10


def test_unique_for_needs_a_key(tasks, daemon):
    with pytest.raises(ValueError, match="unique_key"):
        tasks.add.apply_async((1, 2), unique_for=10)
    with pytest.raises(ValueError, match="unique_key"):
        tasks.broker.task(unique_for=10)(lambda: None)

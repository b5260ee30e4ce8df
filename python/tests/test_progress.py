"""Progress reports: `self.update_state(state=..., meta=...)` in a running task, read back with
`AsyncResult.state` and `.info` as in Celery, in every pool."""

import pathlib

import pytest

from broker_client import TaskRevokedError
from conftest import poll


def test_update_state_shows_in_state_and_info_while_the_task_runs(tasks, worker, gate):
    result = tasks.reports_progress.delay(gate["started"], gate["release"])
    poll(lambda: pathlib.Path(gate["started"]).exists(), what="the task to report and start waiting")
    assert result.state == "PROGRESS"
    assert result.info == {"current": 3, "total": 10}
    assert result.state_and_info() == ("PROGRESS", {"current": 3, "total": 10})
    assert result.info_raw["state"] == "STARTED"
    assert not result.ready()
    pathlib.Path(gate["release"]).touch()
    assert result.get(timeout=20) == "reported"
    assert result.state == "SUCCESS"
    assert result.info == result.result == "reported"
    assert result.state_and_info() == ("SUCCESS", "reported")


def test_info_is_the_exception_of_a_failed_task(tasks, worker):
    result = tasks.fail.delay("value", "no way")
    with pytest.raises(ValueError):
        result.get(timeout=20)
    assert isinstance(result.info, ValueError) and str(result.info) == "no way"


def test_a_revoke_learned_from_a_progress_report_stops_the_task(tasks, worker, gate, tmp_path):
    stopped = tmp_path / "stopped"
    result = tasks.reports_until_revoked.delay(gate["started"], str(stopped))
    poll(lambda: pathlib.Path(gate["started"]).exists(), what="the task to start")
    poll(lambda: result.state == "PROGRESS", what="a progress report")
    assert result.revoke() == "STARTED"
    # The next report (20 ms later) says revoked; the heartbeat, every 20 s, would be much later.
    poll(lambda: stopped.exists(), timeout=5, what="the task to learn of the revoke from its report")
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)
    assert result.info_raw["state"] == "REVOKED"
    poll(lambda: f"[{result.id}] stopped: revoked" in worker.output(), what="the worker to log the revoke")
    assert tasks.add.delay(2, 2).get(timeout=20) == 4


def test_update_state_outside_a_worker_only_warns(tasks, gate):
    pathlib.Path(gate["release"]).touch()
    with pytest.warns(RuntimeWarning, match="outside a worker"):
        assert tasks.reports_progress(gate["started"], gate["release"]) == "reported"

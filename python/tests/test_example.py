"""examples/flask_app.py against a daemon of its own and a worker running it: the export's status route reports
the task's progress, then its result, and its page polls that route."""

import sys

import pytest

from conftest import TESTS_DIR, Daemon, WorkerProcess, poll

EXAMPLES = TESTS_DIR.parent / "examples"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    base = tmp_path_factory.mktemp("example")
    daemon = Daemon(base / "data")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import flask_app
    finally:
        sys.path.remove(str(EXAMPLES))
    flask_app.app.config["BROKER_URL"] = daemon.url
    flask_app.broker.close()
    worker = WorkerProcess(daemon.url, ["default"], base / "worker.log", app="flask_app:broker", cwd=EXAMPLES)
    yield flask_app
    worker.stop()
    flask_app.broker.close()
    daemon.stop()


def test_the_export_page_polls_a_status_route_that_shows_progress(example):
    client = example.app.test_client()
    started = client.post("/exports?steps=4", headers={"Accept": "application/json", "X-User-Id": "2"})
    assert started.status_code == 200
    task_id = started.get_json()["task_id"]
    page = client.get(f"/exports/{task_id}").get_data(as_text=True)
    assert f"/exports/{task_id}/status" in page and "fetch(statusUrl)" in page

    def status():
        return client.get(f"/exports/{task_id}/status").get_json()

    seen = poll(lambda: (s := status())["state"] == "PROGRESS" and s, what="a progress report")
    assert seen["total"] == 4 and 1 <= seen["current"] <= 4
    done = poll(lambda: (s := status())["state"] == "SUCCESS" and s, what="the export to finish")
    assert done["result"] == {"rows": 4000, "for": "grace"}

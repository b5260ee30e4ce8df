"""Periodic tasks kept by the daemon: declared by the app (tests/periodic_app.py), synced by workers at start, run
by workers under the ids of their ticks; crontab(); listing, pausing and removing schedules."""

import subprocess
import sys

import pytest

from broker_client import Broker, BrokerError, NotFound, crontab
from conftest import TESTS_DIR, Daemon, WorkerProcess, poll

#: The schedules tests/periodic_app.py declares.
DECLARED = {"periodic_app.tick", "periodic_app.report", "cleanup hourly", "cleanup-every-90s", "weekday-mornings"}
#: The fields of a schedule's task spec the tests look at.
SPEC_FIELDS = ("task", "queue", "priority", "args", "kwargs")


@pytest.fixture(scope="module")
def sched_daemon(tmp_path_factory):
    """A daemon of their own: schedules tick for as long as it runs, which must not enqueue tasks into the other
    tests' daemon."""
    daemon = Daemon(tmp_path_factory.mktemp("schedules") / "data")
    yield daemon
    daemon.stop()


@pytest.fixture
def app(sched_daemon):
    import periodic_app

    periodic_app.broker.url = sched_daemon.url
    return periodic_app


@pytest.fixture
def start_periodic_worker(sched_daemon, app, tmp_path):
    """Starts workers of tests/periodic_app.py (which sync its schedules); stops them at the end of the test."""
    started = []

    def start():
        proc = WorkerProcess(sched_daemon.url, [app.QUEUE], tmp_path / f"worker-{len(started)}.log", concurrency=1,
                             pool="threads", app="periodic_app:broker")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _by_name(schedules):
    return {info["name"]: info for info in schedules}


def _spec(info):
    return {key: info["task"].get(key) for key in SPEC_FIELDS}


def test_crontab_renders_celerys_fields_as_five_cron_fields():
    assert str(crontab()) == "* * * * *"
    assert str(crontab(minute=0, hour="*/3")) == "0 */3 * * *"
    assert str(crontab(minute=30, hour=7, day_of_week="mon-fri")) == "30 7 * * mon-fri"
    # Field order: minute, hour, day of month, month, day of week; a set renders sorted, in every process alike.
    assert str(crontab(minute=[0, 30], hour={12, 0}, day_of_month="1-7", month_of_year="jan,jul",
                       day_of_week={"sat", "sun"})) == "0,30 0,12 1-7 jan,jul sat,sun"
    assert crontab(minute=5) == crontab(minute="5") != crontab(minute=6)
    with pytest.raises(ValueError, match="minute"):
        crontab(minute="0 12")
    with pytest.raises(TypeError, match="hour"):
        crontab(hour=1.5)
    with pytest.raises(ValueError, match="an empty list"):
        crontab(day_of_week=[])


def test_a_periodic_task_runs_every_second_under_the_ids_of_its_ticks(app, start_periodic_worker):
    start_periodic_worker()
    name = app.tick.name
    ticks = {}

    def two_ticks():
        info = _by_name(app.broker.schedules())[name]
        if "last_ms" in info:
            ticks.setdefault(info["last_ms"], app.broker.AsyncResult(f"sched:{name}:{info['last_ms']}"))
        return len(ticks) >= 2

    poll(two_ticks, timeout=20, interval=0.1, what="two ticks of an every=1 schedule")
    for tick, result in ticks.items():
        assert result.get(timeout=20) == f"sched:{name}:{tick}"  # run by the worker, which saw that id
    first, second = sorted(ticks)
    assert second > first and (second - first) % 1000 == 0


def test_the_worker_declares_every_schedule_and_a_restart_changes_none(app, start_periodic_worker):
    first = start_periodic_worker()
    listed = _by_name(app.broker.schedules())
    assert DECLARED <= set(listed)
    every_90s = listed["cleanup-every-90s"]  # from beat_schedule, with a timedelta
    assert every_90s["every_ms"] == 90_000 and "cron" not in every_90s and "timezone" not in every_90s
    assert _spec(every_90s) == {"task": "periodic_app.cleanup", "queue": "maintenance", "priority": 5, "args": [7],
                                "kwargs": {"dry_run": True}}
    digest = listed["weekday-mornings"]  # from beat_schedule, with a crontab, in conf.timezone
    assert (digest["cron"], digest["timezone"], digest["catch_up"]) == ("30 7 * * mon-fri", "America/New_York", "once")
    assert _spec(digest) == {"task": "elsewhere.send_digest", "queue": "periodic", "priority": 0, "args": [],
                             "kwargs": {"to": "team"}}
    report = listed["periodic_app.report"]  # from periodic_task, with its own time zone
    assert (report["cron"], report["timezone"], report["catch_up"]) == ("*/5 * * * *", "Europe/Paris", "skip")
    assert _spec(report)["queue"] == "reports" and _spec(report)["args"] == ["daily"]
    hourly = listed["cleanup hourly"]  # from add_periodic_task
    assert hourly["every_ms"] == 3_600_000 and _spec(hourly)["args"] == [30]
    assert not any(info["task"].get("context") for info in listed.values())
    assert "schedule cleanup-every-90s: every 90s, task periodic_app.cleanup on queue maintenance" in first.output()

    first.stop()
    start_periodic_worker()
    after = _by_name(app.broker.schedules())
    assert after.keys() == listed.keys()  # nothing added twice
    for name in DECLARED - {"periodic_app.tick"}:
        assert after[name] == listed[name], name  # the same definition changed nothing: next_ms did not move
    ticking = {key: value for key, value in after["periodic_app.tick"].items() if key not in ("next_ms", "last_ms")}
    assert ticking == {key: value for key, value in listed["periodic_app.tick"].items()
                       if key not in ("next_ms", "last_ms")}


def test_declarations_are_checked_before_they_are_sent(sched_daemon):
    broker = Broker(url=sched_daemon.url)
    with pytest.raises(ValueError, match="cron= or every="):
        broker.periodic_task(cron="* * * * *", every=5)
    broker.add_periodic_task(60, broker.signature("x.a"))
    broker.add_periodic_task(60, broker.signature("x.a"))  # the same declaration again is no error
    with pytest.raises(ValueError, match="two periodic tasks are named 'x.a'"):
        broker.add_periodic_task(30, broker.signature("x.a"))
    for entry, error in [({"task": "x.b", "schedule": 5, "relative": True}, "unknown keys"),
                         ({"task": "x.b"}, "needs 'schedule'"),
                         ({"task": "x.b", "schedule": 5, "timezone": "Europe/Paris"}, "'b': a timezone is for cron"),
                         ({"task": "x.b", "schedule": 5, "options": {"task_id": "b-1"}}, "'b': a periodic task takes no "
                                                                                        "task_id"),
                         ({"task": "x.b", "schedule": object()}, "'b': a schedule is seconds")]:
        broker.conf.beat_schedule = {"b": entry}
        with pytest.raises((TypeError, ValueError), match=error):
            broker.sync_schedules()
    broker.conf.beat_schedule = {"x.a": {"task": "x.b", "schedule": 5}}
    with pytest.raises(ValueError, match="declared twice"):
        broker.sync_schedules()
    assert "x.a" not in _by_name(broker.schedules())  # nothing was sent
    broker.conf.beat_schedule = {"b": {"task": "x.b", "schedule": crontab(minute=61)}}
    with pytest.raises(BrokerError, match="schedule 'b': cron") as refused:  # the daemon reads cron expressions
        broker.sync_schedules()
    assert refused.value.code == "bad_request"
    assert broker.remove_schedule("x.a") is True


def test_schedules_the_code_no_longer_declares_stay_until_removed(app, sched_daemon):
    old = Broker(url=sched_daemon.url)
    old.add_periodic_task(crontab(minute=0, hour=3), old.signature("gone.task", args=(1,)), name="old-nightly")
    [info] = old.sync_schedules()
    assert info["cron"] == "0 3 * * *" and info["task"]["args"] == [1]
    listing = subprocess.run([sys.executable, "-m", "broker_client", "schedules", "periodic_app:broker", "--url",
                              sched_daemon.url], cwd=TESTS_DIR, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split(":", 1)[0]: line for line in listing.stdout.splitlines()}
    assert DECLARED | {"old-nightly"} <= set(lines)
    assert "[not declared by periodic_app:broker" in lines["old-nightly"]
    assert "not declared" not in lines["cleanup-every-90s"] and "every 90s" in lines["cleanup-every-90s"]

    paused = app.broker.pause_schedule("old-nightly")
    assert paused["paused"] and "next_ms" not in paused
    resumed = app.broker.resume_schedule("old-nightly")
    assert not resumed["paused"] and resumed["next_ms"] > 0
    assert app.broker.remove_schedule("old-nightly") is True
    assert app.broker.remove_schedule("old-nightly") is False
    assert "old-nightly" not in _by_name(app.broker.schedules())
    with pytest.raises(NotFound):
        app.broker.pause_schedule("old-nightly")

"""Fixtures: a real daemon built from this repository, and real worker processes running tests/tasks_app.py.

The daemon binary is $BROKER_BIN, else target/debug/broker at the repository root (build it with `cargo build`).
Everything listens on 127.0.0.1 only; every wait polls with a deadline.
"""

import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent.parent


def broker_binary():
    path = pathlib.Path(os.environ.get("BROKER_BIN") or REPO_ROOT / "target" / "debug" / "broker")
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(f"broker binary not found at {path}: run `cargo build` at {REPO_ROOT} or set BROKER_BIN",
                    returncode=2)
    return path


def poll(condition, timeout=20.0, interval=0.02, what="condition"):
    """Calls `condition` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pg_store_url():
    """With $BROKER_TEST_PG (a PostgreSQL URL), each daemon runs over that database, in a schema of its own (so
    tests do not see each other's tasks); `None` for the single node."""
    base = os.environ.get("BROKER_TEST_PG")
    if not base:
        return None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", base, "-qc", f"CREATE SCHEMA {schema}"], check=True, capture_output=True, timeout=30)
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


class Daemon:
    def __init__(self, data_dir, extra=()):
        self.log_path = data_dir.parent / "daemon.log"
        self.log = open(self.log_path, "wb")
        store = pg_store_url()
        self.process = subprocess.Popen(
            [str(broker_binary()), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             *([] if "--http" in extra else ["--http", ""]), *(["--store", store] if store else []), *extra],
            stdout=subprocess.PIPE, stderr=self.log,
        )
        line = self._first_line(timeout=30)
        if not line.startswith("broker listening on "):
            raise AssertionError(f"unexpected daemon output {line!r}; log in {self.log_path}")
        self.addr = line.rsplit(" ", 1)[1]
        self.url = f"tcp://{self.addr}"

    def _first_line(self, timeout):
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"the daemon printed no address within {timeout}s; log in {self.log_path}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the daemon exited with {self.process.wait()}; log in {self.log_path}")
            buf += chunk
        return buf.split(b"\n", 1)[0].decode().strip()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class WorkerProcess:
    """`python -m broker_client worker tasks_app:broker` (or another `app`, run from `cwd`) as a child process,
    logging to a file; `extra` are more command line options."""

    def __init__(self, url, queues, log_path, concurrency=2, grace=30.0, prefetch=None, pool="prefork", extra=(),
                 app="tasks_app:broker", cwd=TESTS_DIR):
        self.pool = pool
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker_client", "worker", app, "--url", url,
             "--queues", ",".join(queues), "--concurrency", str(concurrency), "--grace", str(grace)]
            + ([] if prefetch is None else ["--prefetch", str(prefetch)]) + ["--pool", pool, *extra],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        poll(lambda: "worker ready" in self.output() or self.process.poll() is not None, timeout=60,
             what="the worker to start")
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited with {self.process.returncode}:\n{self.output()}")

    def output(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def add_task_at(url):
    """The test app's `add` task, enqueued through its own Broker at `url` (workers run the app's)."""
    import tasks_app
    from broker_client import Broker

    return Broker(url=url).task(name=tasks_app.add.name)(lambda x, y: x + y)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("broker")
    daemon = Daemon(base / "data")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def tasks(daemon):
    """The test app module, pointed at the test daemon."""
    import tasks_app

    tasks_app.flask_app.config["BROKER_URL"] = daemon.url
    tasks_app.broker.close()
    return tasks_app


@pytest.fixture(scope="session", params=["prefork", "threads", "solo"])
def worker(request, daemon, tasks, tmp_path_factory):
    """A worker on the test app's default queue, shared by the tests that do not stop workers; each of them runs
    once per pool (2 processes, 2 threads, solo)."""
    proc = WorkerProcess(daemon.url, [tasks.QUEUE], tmp_path_factory.mktemp("worker") / "worker.log",
                         pool=request.param)
    yield proc
    proc.stop()


@pytest.fixture
def start_worker(daemon, tmp_path):
    """Starts extra workers (on their own queues); stops them at the end of the test."""
    started = []

    def start(queues, **options):
        proc = WorkerProcess(daemon.url, queues, tmp_path / f"worker-{len(started)}.log", **options)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def queue_name():
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gate(tmp_path):
    """Paths a `block` task uses: it writes `started` (its pid) and waits until `release` exists."""
    return {"started": str(tmp_path / "started"), "release": str(tmp_path / "release")}

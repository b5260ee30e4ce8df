"""URLs with several addresses (``tcp://:TOKEN@a:7420,b:7420``, daemons over one shared store): a dead address is
skipped, a call after the daemon stopped goes to the next one, and ``store_unavailable`` moves on too.

The two daemons here have data directories of their own (no shared store): the tests only look at where calls go
and at what is done on the daemon they reached. ``store_unavailable`` comes from a fake daemon that says hello and
refuses every other request with it.
"""

import socket
import threading
import uuid

import pytest
from conftest import Daemon, WorkerProcess, add_task_at, poll

from broker_client import Broker, BrokerError, ConnectionLost, StoreUnavailable
from broker_client import serialization
from broker_client.connection import Connection, _read_frame, _write_frame, parse_addresses, parse_url


def closed_port():
    """An address nothing listens on: a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def two_daemons(tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first, second = Daemon(tmp_path / "first" / "data"), Daemon(tmp_path / "second" / "data")
    yield first, second
    for daemon in (first, second):
        if daemon.process.poll() is None:
            daemon.stop()


class StorelessDaemon:
    """Says hello, then answers every request with ``store_unavailable``, as a daemon whose store is down does.
    Counts the connections it accepts."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    @staticmethod
    def _serve(sock):
        with sock:
            while True:
                try:
                    request = serialization.unpackb(_read_frame(sock))
                except (OSError, ValueError):
                    return
                if request.get("op") == "hello":
                    reply = {"id": request.get("id"), "ok": True,
                             "body": {"version": 1, "server": "storeless", "max_frame": 1 << 24, "role": "admin"}}
                else:
                    reply = {"id": request.get("id"), "ok": False,
                             "error": {"code": "store_unavailable", "message": "the shared store cannot be reached"}}
                try:
                    _write_frame(sock, serialization.packb(reply))
                except OSError:
                    return

    def close(self):
        self.listener.close()


@pytest.fixture
def storeless():
    daemon = StorelessDaemon()
    yield daemon
    daemon.close()


def test_a_list_shares_one_scheme_and_one_token(monkeypatch):
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    assert parse_addresses("a:7420,b:7421") == ([("a", 7420), ("b", 7421)], None, False)
    assert parse_addresses("tcp://:s3cret@a:7420,b:7420") == ([("a", 7420), ("b", 7420)], "s3cret", False)
    assert parse_addresses("tls://a:7420,b:7420/") == ([("a", 7420), ("b", 7420)], None, True)
    assert parse_addresses("tcp://[::1]:7420, [::2]:7421,") == ([("::1", 7420), ("::2", 7421)], None, False)
    assert parse_addresses("tcp://127.0.0.1:7420") == ([("127.0.0.1", 7420)], None, False)
    # parse_url keeps its single-address answer: the first of a list.
    assert parse_url("tcp://:s3cret@a:1,b:2") == ("a", 1, "s3cret", False)
    monkeypatch.setenv("BROKER_TOKEN", "from-env")
    assert parse_addresses("a:1,b:2")[1] == "from-env"
    with pytest.raises(ValueError):
        parse_addresses("http://a:1,b:2")


def test_a_url_whose_first_address_is_dead_connects_to_the_second(daemon, queue_name):
    url = f"tcp://{closed_port()},{daemon.addr}"
    conn = Connection(url)
    conn.open()
    assert f"{conn.host}:{conn.port}" == daemon.addr
    result = add_task_at(url).apply_async((1, 2), queue=queue_name)
    assert result.state == "PENDING"  # enqueued there, and read back from there (no worker serves this queue)


def test_when_every_address_is_dead_the_error_names_each(daemon):
    first, second = closed_port(), closed_port()
    with pytest.raises(ConnectionLost) as caught:
        Connection(f"{first},{second}").open()
    assert first in str(caught.value) and second in str(caught.value)
    # A single address fails as it always did.
    with pytest.raises(ConnectionLost, match=f"cannot connect to the broker at {first}: "):
        Connection(first).open()


def test_after_its_daemon_stops_a_brokers_next_call_goes_to_the_other(two_daemons, queue_name):
    first, second = two_daemons
    broker = Broker(url=f"tcp://{first.addr},{second.addr}")
    assert "totals" in broker.connection().call("stats")
    assert f"{broker.connection().host}:{broker.connection().port}" == first.addr
    first.stop()
    task = broker.task(name="multi.noop")(lambda: None)
    result = task.apply_async(queue=queue_name)  # the first call after the stop: no ConnectionLost
    assert f"{broker.connection().host}:{broker.connection().port}" == second.addr
    assert result.state == "PENDING"
    assert Connection(second.url).call("get", task_id=result.id)["state"] == "PENDING"
    broker.close()


def test_store_unavailable_raises_and_the_next_call_goes_to_the_next_address(daemon, storeless):
    conn = Connection(f"tcp://{storeless.addr},{daemon.addr}")
    with pytest.raises(StoreUnavailable) as caught:
        conn.call("stats")
    assert isinstance(caught.value, BrokerError) and caught.value.code == "store_unavailable"
    assert isinstance(caught.value, ConnectionLost)  # what the retry paths already catch
    assert "totals" in conn.call("stats")
    assert f"{conn.host}:{conn.port}" == daemon.addr
    conn.close()


def test_with_a_single_address_store_unavailable_keeps_the_connection(storeless):
    conn = Connection(f"tcp://{storeless.addr}")
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            conn.call("stats")
    assert storeless.connections == 1
    conn.close()


def test_a_worker_moves_to_the_next_address_when_its_daemon_stops(two_daemons, tmp_path):
    first, second = two_daemons
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(f"tcp://{first.addr},{second.addr}", [queue], tmp_path / "worker.log", concurrency=1)
    try:
        assert add_task_at(first.url).apply_async((1, 2), queue=queue).get(timeout=20) == 3
        first.stop()
        assert add_task_at(second.url).apply_async((20, 22), queue=queue).get(timeout=30) == 42
    finally:
        worker.stop()


def test_a_worker_leaves_a_daemon_that_answers_store_unavailable(daemon, storeless, tmp_path):
    queue = f"q-{uuid.uuid4().hex[:8]}"
    # The threads pool settles tasks on the worker's own connection; prefork children open their own, each
    # starting with the first address again.
    worker = WorkerProcess(f"tcp://{storeless.addr},{daemon.addr}", [queue], tmp_path / "worker.log", concurrency=1,
                           pool="threads")
    try:
        assert add_task_at(daemon.url).apply_async((2, 3), queue=queue).get(timeout=30) == 5
        poll(lambda: storeless.connections >= 2, what="the worker's connections to try the first address")
    finally:
        worker.stop()

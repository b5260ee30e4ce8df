"""A connection's requests that do not wait (``send``): replies and broken connections reach their callbacks."""

import queue
import threading

from broker_client import NotFound
from broker_client.connection import Connection
from broker_client.errors import ConnectionLost


def test_send_calls_back_with_the_reply_or_the_error_even_when_the_connection_breaks(daemon):
    conn = Connection(daemon.url)
    stop = threading.Event()
    pump = threading.Thread(target=conn.pump, args=(stop,), daemon=True)
    pump.start()
    got = queue.Queue()

    def on_reply(body, error):
        got.put((body, error))

    conn.send("stats", on_reply)
    body, error = got.get(timeout=10)
    assert error is None and "totals" in body
    conn.send("get", on_reply, task_id="no-such-task")
    body, error = got.get(timeout=10)
    assert body is None and isinstance(error, NotFound)
    # A synchronous call on the same connection still gets its own reply while the pump reads.
    assert "totals" in conn.call("stats")
    # A reply that never comes (a long poll on an empty queue) before the connection closes: the callback is told.
    conn.send("lease", on_reply, queues=["q-never-filled"], max=1, wait_ms=30_000)
    conn.close()
    body, error = got.get(timeout=10)
    assert body is None and isinstance(error, ConnectionLost)
    stop.set()
    pump.join(timeout=5)
    assert not pump.is_alive()

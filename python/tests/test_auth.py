"""Tokens: the Python client and worker take theirs from the URL or BROKER_TOKEN, and never log it."""

import pytest

from broker_client.connection import Connection, redact
from broker_client.errors import BrokerError
from conftest import Daemon, WorkerProcess, add_task_at

PRODUCER = "py-producer-token-0123456789abcdef"
WORKER = "py-worker-token-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    base = tmp_path_factory.mktemp("secured")
    config = base / "broker.toml"
    config.write_text(
        f'[[tokens]]\nname = "web"\ntoken = "{PRODUCER}"\nrole = "producer"\n'
        f'[[tokens]]\nname = "workers"\ntoken = "{WORKER}"\nrole = "worker"\n'
    )
    daemon = Daemon(base / "data", extra=["--config", str(config)])
    yield daemon
    daemon.stop()


def test_hello_without_a_token_is_refused(secured, monkeypatch):
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    with pytest.raises(BrokerError) as refused:
        Connection(secured.url).call("get", task_id="x")
    assert refused.value.code == "unauthorized"


def test_the_token_comes_from_the_url_or_broker_token(secured, monkeypatch):
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    by_url = Connection(f"tcp://:{PRODUCER}@{secured.addr}")
    by_url.open()
    assert by_url.server_info["role"] == "producer"
    monkeypatch.setenv("BROKER_TOKEN", WORKER)
    by_env = Connection(secured.url)
    by_env.open()
    assert by_env.server_info["role"] == "worker"
    assert redact(f"tcp://:{PRODUCER}@{secured.addr}") == f"tcp://***@{secured.addr}"


def test_a_producer_enqueues_and_a_worker_runs_but_neither_may_revoke(secured, tmp_path, monkeypatch):
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    result = add_task_at(f"tcp://:{PRODUCER}@{secured.addr}").apply_async((2, 3), queue="secured")
    worker = WorkerProcess(f"tcp://:{WORKER}@{secured.addr}", ["secured"], tmp_path / "worker.log", concurrency=1)
    try:
        assert result.get(timeout=20) == 5
        with pytest.raises(BrokerError) as refused:
            result.revoke()
        assert refused.value.code == "forbidden"
    finally:
        worker.stop()
    assert WORKER not in worker.output(), "the worker logged its token"
    assert "tcp://***@" in worker.output()

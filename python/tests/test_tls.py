"""tls:// URLs: the Python client and worker speak TLS to a daemon with a certificate, trusting BROKER_TLS_CA."""

import shutil
import subprocess

import pytest

from broker_client.connection import Connection
from broker_client.errors import ConnectionLost
from conftest import Daemon, WorkerProcess, add_task_at


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: no certificate for the TLS test (apt-get install -y openssl)")
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    config = base / "broker.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    daemon = Daemon(base / "data", extra=["--config", str(config)])
    daemon.ca = cert
    yield daemon
    daemon.stop()


def test_a_tls_url_needs_the_ca_and_then_works(tls_daemon, monkeypatch, tmp_path):
    port = tls_daemon.addr.rsplit(":", 1)[1]
    monkeypatch.delenv("BROKER_TLS_CA", raising=False)
    with pytest.raises(ConnectionLost, match="TLS"):
        Connection(f"tls://localhost:{port}").open()
    monkeypatch.setenv("BROKER_TLS_CA", str(tls_daemon.ca))
    conn = Connection(f"tls://localhost:{port}")
    assert conn.call("stats")["connections"] >= 1

    result = add_task_at(f"tls://localhost:{port}").apply_async((20, 22), queue="tls")
    worker = WorkerProcess(f"tls://localhost:{port}", ["tls"], tmp_path / "worker.log", concurrency=1)
    try:
        assert result.get(timeout=20) == 42
    finally:
        worker.stop()

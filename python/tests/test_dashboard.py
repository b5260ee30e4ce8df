"""The dashboard in a real browser: headless Chromium driven over the DevTools protocol loads the pages, checks
their DOM (queue rows, a task page, the dead set), clicks Requeue, and saves screenshots under target/.

Chromium comes from Debian's `chromium` package, which scripts/test installs when it is missing; without it this
test is skipped with that message."""

import base64
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from broker_client.connection import Connection
from conftest import REPO_ROOT, Daemon, poll

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SHOTS = REPO_ROOT / "target" / "dashboard"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium page, driven over the DevTools protocol (websocket-client)."""

    def __init__(self):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="broker-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
             "--window-size=1280,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 30
        browser_ws = None
        while browser_ws is None:
            line = self.process.stderr.readline()
            if not line and (self.process.poll() is not None or time.monotonic() > deadline):
                raise AssertionError("chromium did not start its DevTools endpoint")
            if "DevTools listening on " in line:
                browser_ws = line.split("DevTools listening on ", 1)[1].strip()
        port = browser_ws.split("//", 1)[1].split("/", 1)[0]
        from urllib.request import urlopen

        pages = poll(lambda: [t for t in json.load(urlopen(f"http://{port}/json/list")) if t["type"] == "page"],
                     what="a chromium page")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0
        self.call("Page.enable")

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url):
        self.call("Page.navigate", url=url)
        poll(lambda: self.eval("document.readyState") == "complete" and self.eval("location.href") == url,
             what=f"{url} to load")

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self, name):
        SHOTS.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = SHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        try:
            self.ws.close()
        finally:
            self.process.kill()
            self.process.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test installs Debian's `chromium`; "
                    "or apt-get install -y chromium): the dashboard's browser test cannot run")
    http = free_port()
    daemon = Daemon(tmp_path_factory.mktemp("dash") / "data", extra=["--http", f"127.0.0.1:{http}"])
    daemon.http = f"http://127.0.0.1:{http}"
    poll(lambda: _reachable(http), what="the HTTP listener")
    browser = Browser()
    yield daemon, browser
    browser.close()
    daemon.stop()


def _reachable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_the_dashboard_shows_queues_tasks_and_requeues_a_dead_task(dashboard):
    daemon, browser = dashboard
    conn = Connection(daemon.url)
    for i in range(3):
        conn.call("enqueue", task={"task": "reports.export", "args": [i, "csv"], "queue": "dash-reports"})
    leased = conn.call("lease", queues=["dash-reports"], max=2)["tasks"]
    done, dead = leased
    conn.call("ack", task_id=done["id"], lease_id=done["lease_id"], result={"rows": 120})
    conn.call("fail", task_id=dead["id"], lease_id=dead["lease_id"], retry=False,
              error={"type": "ValueError", "message": "bad format", "traceback": "Traceback: ...\nValueError"})

    browser.goto(daemon.http + "/")
    queues = browser.eval("[...document.querySelectorAll('#queues tr.queue')].map(r => r.dataset.queue)")
    assert "dash-reports" in queues
    ready = browser.eval("document.querySelector('#queues tr[data-queue=\"dash-reports\"] td:nth-child(2)').textContent")
    assert ready == "1"
    browser.screenshot("overview")

    browser.goto(f"{daemon.http}/task/{done['id']}")
    assert browser.eval("document.querySelector('#task-state').textContent") == "SUCCESS"
    assert '"rows": 120' in browser.eval("document.querySelector('#task-result').textContent")
    browser.screenshot("task")

    browser.goto(daemon.http + "/dead")
    row = f"tr[data-id=\"{dead['id']}\"]"
    assert browser.eval(f"!!document.querySelector('{row}')")
    assert "ValueError" in browser.eval(f"document.querySelector('{row} td.error').textContent")
    browser.screenshot("dead")
    browser.eval(f"document.querySelector('{row} button.requeue').click()")
    poll(lambda: browser.eval(f"document.readyState == 'complete' && !document.querySelector('{row}')"),
         what="the requeued task to leave the dead set")
    assert conn.call("get", task_id=dead["id"])["state"] == "PENDING"
    assert browser.eval("document.querySelector('#dead tbody').textContent").strip().startswith("Nothing")


def test_the_dashboard_pauses_a_queue_for_every_worker(dashboard):
    daemon, browser = dashboard
    conn = Connection(daemon.url)
    conn.call("enqueue", task={"task": "mail.send", "args": ["ada@example.com"], "queue": "dash-mail"})
    conn.call("schedule_add", name="dash-digest", task={"task": "mail.digest"}, cron="0 7 * * MON",
              timezone="Europe/Paris")
    browser.goto(daemon.http + "/")
    row = "#queues tr[data-queue=\"dash-mail\"]"
    assert browser.eval(f"document.querySelector('{row}').dataset.paused") == "false"
    browser.eval(f"document.querySelector('{row} button.pause').click()")
    poll(lambda: browser.eval(f"document.readyState == 'complete' && "
                              f"document.querySelector('{row}')?.dataset.paused == 'true'"),
         what="the queue row to say paused")
    assert conn.call("lease", queues=["dash-mail"], max=1)["tasks"] == [], "no worker gets its tasks"
    assert "dash-digest" in browser.eval("document.querySelector('#schedules').textContent")
    browser.screenshot("paused")
    browser.eval(f"document.querySelector('{row} button.pause').click()")
    poll(lambda: browser.eval(f"document.readyState == 'complete' && "
                              f"document.querySelector('{row}')?.dataset.paused == 'false'"),
         what="the queue row to say resumed")
    assert len(conn.call("lease", queues=["dash-mail"], max=1)["tasks"]) == 1

"""The app the tests enqueue into and the test workers run: a Flask app bound to a Broker, with tasks that
exercise results, failures, retries, blocking, bad results, the Flask request context, limits, unique keys,
progress reports, time limits and workflows."""

import asyncio
import os
import time

from flask import Flask, g, has_app_context, has_request_context, jsonify, request, url_for

from broker_client import Broker, SoftTimeLimitExceeded, TaskRevokedError

QUEUE = "tests"

flask_app = Flask(__name__)
flask_app.config.update(BROKER_DEFAULT_QUEUE=QUEUE, BROKER_CONTEXT_G_KEYS=["user"],
                        # Authorization is allowed here to show that the deny list still wins.
                        BROKER_CONTEXT_HEADERS=["X-Trace", "Authorization"])
broker = Broker(flask_app)


class User:
    """Stands in for an ORM object: not plain data, so it travels through the g dumper/loader below."""

    def __init__(self, id, name):
        self.id = id
        self.name = name


USERS = {7: User(7, "ada"), 8: User(8, "grace")}


@broker.g_dumper("user")
def dump_user(user):
    return user.id


@broker.g_loader("user")
def load_user(user_id):
    return USERS[user_id]


class PaymentDeclined(Exception):
    pass


@broker.task
def add(x, y):
    return x + y


@broker.task
def mul(x, y):
    return x * y


@broker.task
def tsum(numbers, extra=0):
    """A chord's callback: the sum of its members' results."""
    return sum(numbers) + extra


@broker.task
async def async_add(x, y):
    await asyncio.sleep(0.001)
    return x + y


@broker.task
def fail(kind, message):
    if kind == "value":
        raise ValueError(message)
    raise PaymentDeclined(message)


@broker.task(bind=True, max_retries=5)
def flaky(self, succeed_on_retry, countdown):
    if self.request.retries < succeed_on_retry:
        self.retry(exc=ConnectionError(f"attempt {self.request.retries} failed"), countdown=countdown)
    return {"retries": self.request.retries, "id": self.request.id}


@broker.task(bind=True, max_retries=1)
def always_retries(self):
    self.retry(exc=KeyError("missing"), countdown=0.05)


@broker.task(autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.05)
def autoretried(path):
    # Counts attempts in a file so the test sees every one.
    with open(path, "a") as f:
        f.write("x")
    raise ConnectionError("upstream down")


@broker.task(lease_timeout=1.5)
def block(started, release, result=None):
    """Records its pid in `started`, then waits (up to a minute) until the file `release` exists."""
    with open(started, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.02)
    return result


@broker.task
def bad_result():
    return {"when": object()}


@broker.task(bind=True, max_retries=3)
def whoami(self, retry_first=False):
    """Reads the request the task was enqueued from, as a view would."""
    if retry_first and self.request.retries == 0:
        self.retry(countdown=0.05)
    if not has_request_context():
        return {"request": False, "app_context": has_app_context()}
    return {
        "request": True,
        "retries": self.request.retries,
        "path": request.path,
        "method": request.method,
        "args": request.args.to_dict(),
        "trace": request.headers.get("X-Trace"),
        "authorization": request.headers.get("Authorization"),
        "user": g.user.name,
        "user_type": type(g.user).__name__,
        "url": url_for("report", report_id=5, _external=True),
    }


@flask_app.before_request
def login():
    user_id = request.headers.get("X-User-Id")
    if user_id:
        g.user = USERS[int(user_id)]


@flask_app.route("/reports/<int:report_id>", methods=["GET", "POST"])
def report(report_id):
    result = whoami.delay(retry_first=request.args.get("retry") == "1")
    return jsonify(task_id=result.id)


@broker.task(bind=True)
def trace_seen(self):
    """The trace this task runs in, as the task sees it."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return {"traceparent": self.request.traceparent,
            "trace_id": format(context.trace_id, "032x") if context.is_valid else None}


@broker.task(rate_limit="5/s")
def stamped():
    """When it started: the rate limit test reads the starts."""
    return time.time()


@broker.task(unique_key=lambda args, kwargs: f"sync:{args[0]}")
def sync_account(account, started, release):
    """A unique task per account, held until it finishes; blocks as `block` does."""
    return block(started, release, account)


@broker.task(bind=True)
def reports_progress(self, started, release):
    """Reports 3 of 10, then blocks as `block` does."""
    self.update_state(state="PROGRESS", meta={"current": 3, "total": 10})
    return block(started, release, "reported")


@broker.task(bind=True, lease_timeout=60)
def reports_until_revoked(self, started, stopped):
    """Reports progress every 20 ms for a minute; writes `stopped` when a report says it was revoked. Its lease is
    long, so no heartbeat (every 20 s) learns of the revoke first."""
    with open(started, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        for i in range(3000):
            self.update_state(meta={"current": i})
            time.sleep(0.02)
    except TaskRevokedError:
        with open(stopped, "w") as f:
            f.write("stopped")
        raise
    return "never revoked"


def _nap(seconds, on_soft_limit):
    """Sleeps `seconds` in 20 ms naps (a thread takes an asynchronous exception between two). At the soft time
    limit: "return" returns "cleaned up", "raise" lets it fail the task, "ignore" naps on."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            while time.monotonic() < deadline:
                time.sleep(0.02)
            return "slept"
        except SoftTimeLimitExceeded:
            if on_soft_limit == "return":
                return "cleaned up"
            if on_soft_limit == "raise":
                raise


@broker.task(soft_time_limit=0.5)
def soft_limited(seconds, on_soft_limit="return"):
    return _nap(seconds, on_soft_limit)


@broker.task(soft_time_limit=0.5)
async def async_soft_limited(seconds):
    """Waits in its event loop, where the soft time limit cancels it (or raises in it, if it is running then)."""
    try:
        await asyncio.sleep(seconds)
    except (SoftTimeLimitExceeded, asyncio.CancelledError):
        return "cleaned up"
    return "slept"


@broker.task
def naps(seconds, on_soft_limit="return"):
    """No limits of its own: the worker's --soft-time-limit and --time-limit apply."""
    return _nap(seconds, on_soft_limit)


@broker.task(time_limit=1)
def overruns(seconds):
    """One long sleep in C, past its time limit."""
    time.sleep(seconds)
    return "slept"

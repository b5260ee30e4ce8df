"""A Flask app that moves slow work out of the request with broker.

Run it (from python/examples/, with a daemon running: `broker serve` at the repository root):

    pip install '../[flask]'                           # or: pip install -e '../[flask]'
    flask --app flask_app run                          # the web app on http://127.0.0.1:5000
    python -m broker_client worker flask_app:broker --queues default --concurrency 2

Then open http://127.0.0.1:5000/ and press the button (or `curl -X POST -H 'X-User-Id: 1' localhost:5000/reports`).
The task runs in the worker inside a copy of the request: `request.path`, `request.args`, `request.headers`,
`url_for(..., _external=True)` and `g.user` are what the view saw.
"""

import os
import time

from flask import Flask, g, jsonify, render_template_string, request, url_for

from broker_client import Broker

app = Flask(__name__)
app.config.update(
    BROKER_URL=os.environ.get("BROKER_URL", "tcp://127.0.0.1:7420"),
    # Headers copied into each task's context (an allow list). The context is stored in the daemon's data
    # directory, so never list a header that carries a secret.
    BROKER_CONTEXT_HEADERS=["User-Agent", "Accept-Language", "X-Request-Id"],
    BROKER_CONTEXT_G_KEYS=["user"],
)
broker = Broker(app)


class User:
    """Stands in for an ORM model."""

    def __init__(self, id, name):
        self.id, self.name = id, name


USERS = {1: User(1, "ada"), 2: User(2, "grace")}


# g.user is an object: it travels as its id and is loaded again in the worker.
@broker.g_dumper("user")
def dump_user(user):
    return user.id


@broker.g_loader("user")
def load_user(user_id):
    return USERS[user_id]


@app.before_request
def authenticate():
    g.user = USERS.get(int(request.headers.get("X-User-Id", request.args.get("user", 1))))


@broker.task(bind=True, max_retries=3, lease_timeout=60)
def build_report(self, kind):
    """The slow work: runs in the worker with the request it came from."""
    time.sleep(2)
    return {
        "kind": kind,
        "for": g.user.name,
        "requested_at": request.path,
        "format": request.args.get("format", "html"),
        "trace": request.headers.get("X-Request-Id"),
        "status_page": url_for("report_status", task_id=self.request.id, _external=True),
        "attempt": self.request.retries + 1,
    }


PAGE = """<!doctype html><title>Reports</title>
<h1>Reports for {{ g.user.name }}</h1>
<form method=post action="{{ url_for('start_report', format='pdf') }}"><button>Build a report</button></form>
"""

STATUS = """<!doctype html><title>Report {{ task_id }}</title>
{% if state not in ('SUCCESS', 'FAILURE', 'REVOKED') %}<meta http-equiv=refresh content=1>{% endif %}
<h1>Report {{ task_id }}</h1><p>State: <b>{{ state }}</b></p>
{% if result %}<pre>{{ result | tojson(indent=2) }}</pre>{% endif %}
{% if error %}<pre>{{ error }}</pre>{% endif %}
"""


@app.get("/")
def index():
    return render_template_string(PAGE)


@app.post("/reports")
def start_report():
    result = build_report.delay("sales")
    if request.accept_mimetypes.best == "application/json":
        return jsonify(task_id=result.id, status=url_for("report_status", task_id=result.id, _external=True))
    return render_template_string('<meta http-equiv=refresh content="0;url={{ u }}">',
                                  u=url_for("report_status", task_id=result.id))


@app.get("/reports/<task_id>")
def report_status(task_id):
    result = broker.AsyncResult(task_id)
    state = result.state
    error = None
    if state == "FAILURE":
        error = f"{result.result.type_name}: {result.result}"
    data = result.result if state == "SUCCESS" else None
    if request.accept_mimetypes.best == "application/json":
        return jsonify(task_id=task_id, state=state, result=data, error=error)
    return render_template_string(STATUS, task_id=task_id, state=state, result=data, error=error)

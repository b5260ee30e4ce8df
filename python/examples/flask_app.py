"""A Flask app that moves slow work out of the request with broker.

Run it (from python/examples/, with a daemon running: `broker serve` at the repository root):

    pip install '../[flask]'                           # or: pip install -e '../[flask]'
    flask --app flask_app run                          # the web app on http://127.0.0.1:5000
    python -m broker_client worker flask_app:broker --queues default --concurrency 2

Then open http://127.0.0.1:5000/ and press a button (or `curl -X POST -H 'X-User-Id: 1' localhost:5000/reports`).
The task runs in the worker inside a copy of the request: `request.path`, `request.args`, `request.headers`,
`url_for(..., _external=True)` and `g.user` are what the view saw.

"Export" starts a long task that reports its progress (`self.update_state`); its page polls a JSON status route
and draws a progress bar with plain JavaScript.
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


@broker.task(bind=True, lease_timeout=60)
def export_rows(self, steps):
    """A long task that says how far it got: AsyncResult.state is "PROGRESS" and .info its meta while it runs."""
    for done in range(steps):
        time.sleep(0.3)  # one chunk of the work
        self.update_state(state="PROGRESS", meta={"current": done + 1, "total": steps})
    return {"rows": steps * 1000, "for": g.user.name}


PAGE = """<!doctype html><title>Reports</title>
<h1>Reports for {{ g.user.name }}</h1>
<form method=post action="{{ url_for('start_report', format='pdf') }}"><button>Build a report</button></form>
<form method=post action="{{ url_for('start_export') }}"><button>Export (with a progress bar)</button></form>
"""

EXPORT = """<!doctype html><title>Export {{ task_id }}</title>
<h1>Export {{ task_id }}</h1>
<div style="width:400px;border:1px solid #888"><div id=bar style="width:0;height:20px;background:#4a8"></div></div>
<p id=status>Waiting for a worker...</p>
<script>
const statusUrl = {{ url_for('export_status', task_id=task_id) | tojson }};
async function refresh() {
  const s = await (await fetch(statusUrl)).json();
  if (s.total) {
    document.getElementById("bar").style.width = (100 * s.current / s.total) + "%";
  }
  let text = s.state + (s.total ? ": " + s.current + " of " + s.total : "");
  if (s.state === "SUCCESS") text += " (" + JSON.stringify(s.result) + ")";
  if (s.error) text += ": " + s.error;
  document.getElementById("status").textContent = text;
  if (!["SUCCESS", "FAILURE", "REVOKED"].includes(s.state)) setTimeout(refresh, 500);
}
refresh();
</script>
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


def started(result, status, page):
    """The reply to a form that started a task: its id and status URL (JSON), or a redirect to its page."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify(task_id=result.id, status=url_for(status, task_id=result.id, _external=True))
    return render_template_string('<meta http-equiv=refresh content="0;url={{ u }}">',
                                  u=url_for(page, task_id=result.id))


@app.post("/reports")
def start_report():
    return started(build_report.delay("sales"), "report_status", "report_status")


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


@app.post("/exports")
def start_export():
    return started(export_rows.delay(int(request.args.get("steps", 20))), "export_status", "export_page")


@app.get("/exports/<task_id>")
def export_page(task_id):
    return render_template_string(EXPORT, task_id=task_id)


@app.get("/exports/<task_id>/status")
def export_status(task_id):
    """What the page polls: the state and, while the task runs, how far it got (its last progress report)."""
    result = broker.AsyncResult(task_id)
    state, info = result.state_and_info()  # one request: .state then .info would be two, and the task moves on
    status = {"task_id": task_id, "state": state, "current": 0, "total": 0, "result": None, "error": None}
    if state == "PROGRESS" and isinstance(info, dict):
        status.update(current=info["current"], total=info["total"])
    elif state == "SUCCESS":
        status.update(current=1, total=1, result=info)
    elif state == "FAILURE":
        status["error"] = f"{info.type_name}: {info}"
    return jsonify(status)

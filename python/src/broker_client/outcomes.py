"""Settling a leased task with the daemon (ack, fail, release) and the log line each reply earns.

Used by whoever settles: a prefork child for the tasks it ran, the worker process for the threads and solo pools,
for a child that died and for shutdown. Every call is pipelined (``Connection.send``): it returns once the request
is written, and the reply is logged by the thread that reads it (the worker's reply thread, or the child's loop).
``done`` is then called with no argument, whatever the reply was.
"""

import logging
import time

from .errors import BrokerError, ConnectionLost

log = logging.getLogger("broker_client.worker")


def _label(job):
    return f"{job.get('task')}[{job.get('id')}]"


def _send(conn, op, job, on_reply, done, fields):
    def callback(body, error):
        try:
            on_reply(body, error)
        finally:
            if done is not None:
                done()

    try:
        conn.send(op, callback, task_id=job["id"], lease_id=job["lease_id"], **fields)
    except (BrokerError, ConnectionLost) as e:
        callback(None, e)


def settle(conn, job, outcome, runtime, done=None):
    """Reports a run's outcome: ``ack`` with the result on success, else ``fail`` (retrying or not); a task that
    learned from a progress report that it was revoked ends REVOKED."""
    if outcome.get("revoked"):
        settle_revoked(conn, job, done)
        return
    label = _label(job)
    if outcome.get("ok"):
        def acked(_body, error):
            if error is None:
                log.info("task %s succeeded in %.3fs", label, runtime)
            else:
                log_refused(label, error)

        _send(conn, "ack", job, acked, done, {"result": outcome.get("result")})
        return
    error = outcome["error"]
    fields = {"error": error, "retry": bool(outcome.get("retry"))}
    if outcome.get("countdown_ms") is not None:
        fields["countdown_ms"] = outcome["countdown_ms"]

    def failed(reply, refused):
        if refused is not None:
            log_refused(label, refused)
            return
        attempt = job.get("attempt", 1)
        total = job.get("max_retries", 0) + 1
        summary = f"{error.get('type')}: {error.get('message')}"
        if reply.get("state") == "RETRY":
            delay = max(0.0, (reply.get("retry_at_ms", 0) / 1000) - time.time())
            log.warning("task %s failed (attempt %d of %d), retrying in %.1fs: %s", label, attempt, total, delay,
                        summary)
        else:
            why = "no retries left" if outcome.get("retry") else "not retried"
            trace = error.get("traceback")
            log.error("task %s FAILED (attempt %d of %d, %s): %s%s", label, attempt, total, why, summary,
                      f"\n{trace.rstrip()}" if trace else "")

    _send(conn, "fail", job, failed, done, fields)


def settle_revoked(conn, job, done=None):
    """Ends a task the daemon said was revoked (stopped while running, or never started): the daemon answers
    ``revoked`` and records it REVOKED."""
    def logged(_body, _error):
        log.warning("task %s stopped: revoked", _label(job))

    _send(conn, "fail", job, logged, done,
          {"retry": False, "error": {"type": "TaskRevokedError", "message": "revoked while running"}})


def time_limit_exceeded(limit):
    """The outcome of a task stopped at its hard time limit: failed, not retried (as Celery)."""
    return {"ok": False, "retry": False,
            "error": {"type": "TimeLimitExceeded", "message": f"the task ran past its time limit ({limit}s)"}}


def release(conn, job, why, done=None):
    """Gives a leased task back to its queue, the attempt not counted."""
    def released(_body, error):
        if error is None:
            log.info("task %s released to its queue (%s)", _label(job), why)
        else:
            log.warning("task %s: release failed (%s); its lease will expire and return it", _label(job), error)

    _send(conn, "release", job, released, done, {})


def log_refused(label, error):
    """Logs why an ack or fail was not recorded."""
    if isinstance(error, ConnectionLost):
        log.error("task %s: could not report its outcome (%s); the task will run again", label, error)
    elif error.code == "revoked":
        log.warning("task %s was revoked while running; its outcome was discarded", label)
    elif error.code == "lease_lost":
        log.error("task %s finished but its lease was lost; the outcome was discarded and the task will run again",
                  label)
    else:
        log.error("task %s: the daemon refused its outcome: %s", label, error)

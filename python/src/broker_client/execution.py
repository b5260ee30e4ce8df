"""The child side of the worker: a process that imports the app and runs one task at a time.

The parent (:mod:`broker_client.worker`) sends a leased task as one MessagePack message over a pipe; the child
runs it inside the right Flask context and answers with one outcome message: ``{"ok": true, "result": ...}``, or
``{"ok": false, "retry": bool, "countdown_ms": int|None, "error": {type, message, traceback}}``. The child never
talks to the daemon: the parent holds the leases, the heartbeats and the acks, so a crashing task cannot lose one.

Children ignore SIGINT and SIGTERM (the parent decides when they stop) and die with the parent (Linux
``PR_SET_PDEATHSIG``, and an end-of-file on the pipe elsewhere).
"""

import asyncio
import ctypes
import importlib
import inspect
import os
import signal
import sys
import time
import threading
import traceback

from . import flask_context, serialization
from .errors import NotRegistered, Retry, SerializationError


def load_broker(spec):
    """Finds the Broker named by ``module:attr`` (or ``module``). `attr` may also be a Flask app bound with
    ``init_app``. Imports the broker's ``include`` modules so their tasks register."""
    from .app import Broker

    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    else:
        candidates = [getattr(module, n, None) for n in ("broker", "app", "celery")]
        candidates += [v for v in vars(module).values()]
        obj = next((c for c in candidates if isinstance(c, Broker) or _flask_broker(c)), None)
        if obj is None:
            raise LookupError(f"module {module_name} has no Broker instance; name it as {module_name}:NAME")
    if not isinstance(obj, Broker):
        broker = _flask_broker(obj)
        if broker is None:
            raise LookupError(f"{spec} is a {type(obj).__name__}, not a Broker or a Flask app with init_app")
        obj = broker
    for name in obj.include:
        importlib.import_module(name)
    return obj


def _flask_broker(obj):
    extensions = getattr(obj, "extensions", None)
    return extensions.get("broker") if isinstance(extensions, dict) else None


def describe_exception(exc):
    """The protocol's error map for an exception: type name, message, formatted traceback."""
    kind = type(exc)
    module = kind.__module__
    name = kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
    message = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        message = repr(exc.args[0])
    return {"type": name, "message": message, "traceback": text}


_local = threading.local()


def _event_loop():
    """This thread's event loop for `async def` tasks, created once and kept (a loop per task costs more than a
    no-op task)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop


def run_job(broker, job):
    """Runs one leased task; returns its outcome map (never raises)."""
    from .app import TaskRequest

    name = job["task"]
    task = broker.tasks.get(name)
    if task is None:
        known = ", ".join(sorted(broker.tasks)) or "none"
        exc = NotRegistered(f"task {name!r} is not registered in this worker (registered: {known}); "
                            f"check the worker imports the module that defines it (Broker(include=[...]))")
        return {"ok": False, "retry": False, "error": {"type": "broker_client.errors.NotRegistered",
                                                        "message": exc.args[0], "traceback": None}}
    retries = max(0, job.get("attempt", 1) - 1)
    request = TaskRequest(id=job["id"], retries=retries, max_retries=job.get("max_retries"), queue=job.get("queue"),
                          task=name, context=job.get("context"), args=job.get("args", []),
                          kwargs=job.get("kwargs", {}), called_directly=False)
    task._push_request(request)
    try:
        with flask_context.task_context(broker.flask_app, job.get("context"), broker.g_loaders):
            result = task(*job.get("args", []), **job.get("kwargs", {}))
            if inspect.isawaitable(result):  # an `async def` task: run it on this thread's event loop
                result = _event_loop().run_until_complete(result)
        try:
            serialization.check_value(f"the result of {name}", result, "be stored as a task result")
        except SerializationError as exc:
            return {"ok": False, "retry": False, "error": describe_exception(exc)}
        return {"ok": True, "result": result}
    except Retry as r:
        error = (describe_exception(r.exc) if r.exc is not None
                 else {"type": "Retry", "message": "the task called self.retry()"})
        countdown = None if r.countdown is None else max(0, int(r.countdown * 1000))
        return {"ok": False, "retry": True, "countdown_ms": countdown, "error": error}
    except BaseException as exc:  # a task may raise anything, SystemExit included; it must not kill the child
        error = describe_exception(exc)
        limit = request.max_retries
        if task.autoretry_for and isinstance(exc, task.autoretry_for) and (limit is None or retries < limit):
            # With retry_backoff the daemon's exponential backoff (set at enqueue) picks the delay.
            countdown = None if task.retry_backoff else int(task.default_retry_delay * 1000)
            return {"ok": False, "retry": True, "countdown_ms": countdown, "error": error}
        return {"ok": False, "retry": False, "error": error}
    finally:
        task._pop_request()


def _die_with_parent(parent_pid):
    """Asks Linux to SIGKILL this process when the parent dies; exits now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def child_main(pipe, app_spec, url, parent_pid):
    """The child process's entry point: load the app, then answer jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        broker = load_broker(app_spec)
        if url:
            broker.url = url
    except BaseException:
        pipe.send_bytes(serialization.packb({"fatal": traceback.format_exc()}))
        return
    pipe.send_bytes(serialization.packb({"ready": True}))
    while True:
        try:
            job = serialization.unpackb(pipe.recv_bytes())
        except (EOFError, OSError):
            return
        started = time.monotonic()
        outcome = run_job(broker, job)
        outcome["runtime"] = time.monotonic() - started
        try:
            pipe.send_bytes(serialization.packb(outcome))
        except (BrokenPipeError, OSError):
            return

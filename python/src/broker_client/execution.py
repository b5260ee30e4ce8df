"""The child side of the prefork pool: a process that imports the app and runs the tasks its parent hands it.

The parent (:mod:`broker_client.worker`) holds the leases and the heartbeats. It sends tasks in batches over a
pipe, as MessagePack messages: ``{"batch": [task, ...]}``, and ``{"revoke": id}`` (a handed task the daemon says
was revoked: settle it without running it). The child runs them in order, one at a time, and settles each itself
on a connection of its own (``ack`` or ``fail``, pipelined: it does not wait for the reply to start the next
task). When it has settled the last task of a batch it tells the parent ``{"done": n}``, n counting every task
handed to it that it is done with.

Three counters in memory shared with the parent, numbering tasks in hand-off order, say how far the child got:
tasks *claimed* (started, or being settled without running) and *done* are the child's; the *limit* is the
parent's: the child claims a task only below it, under a lock they share. At a warm shutdown the parent sets the
limit to what is claimed and releases the rest itself, even while the child runs a long task. If the child dies,
the parent reads them: the task claimed but not done was running (it fails it with ``WorkerLostError``), the tasks
not claimed go back to their queue unrun. A fourth says when the running task was claimed: past the task's hard
time limit the parent kills the child and fails the task with ``TimeLimitExceeded``. The soft time limit is the
child's own (SIGALRM).

Children ignore SIGINT and SIGTERM (the parent decides when they stop) and die with the parent (Linux
``PR_SET_PDEATHSIG``, and an end-of-file on the pipe elsewhere).
"""

import asyncio
import collections
import ctypes
import importlib
import inspect
import logging
import os
import select
import signal
import sys
import time
import threading
import traceback

from . import flask_context, outcomes, serialization, tracing
from .errors import NotRegistered, Retry, SerializationError, SoftTimeLimitExceeded


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
_loops = {}  # thread ident → that thread's event loop, for wake_loop


def _event_loop():
    """This thread's event loop for `async def` tasks, created once and kept (a loop per task costs more than a
    no-op task)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = _loops[threading.get_ident()] = asyncio.new_event_loop()
    return loop


def wake_loop(ident):
    """Wakes the event loop of thread `ident`, if it has one, so that an exception just raised in that thread (a
    time limit) is not held up while the loop waits for I/O or a timer."""
    loop = _loops.get(ident)
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(_no_op)


def _no_op():
    pass


def _run_coroutine(awaitable):
    """Runs an `async def` task to its end on this thread's event loop."""
    loop = _event_loop()
    task = asyncio.ensure_future(awaitable, loop=loop)
    try:
        return loop.run_until_complete(task)
    except BaseException as struck:
        if task.done():
            raise
        # A time limit struck while the loop waited, outside the task's code, so it could not be raised where the
        # task awaits: cancel the task there instead (it sees CancelledError and may clean up, or even return),
        # so that nothing of it stays on the loop to run on during the next task.
        task.cancel()
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise struck from None


def time_limits(task, defaults):
    """The (soft, hard) time limits of `task` in seconds: its own, else the worker's `defaults`; None or 0 is no
    limit."""
    soft, hard = defaults
    return (soft if task.soft_time_limit is None else task.soft_time_limit,
            hard if task.time_limit is None else task.time_limit)


def run_job(broker, job, limiter=None):
    """Runs one leased task; returns its outcome map (never raises). `limiter`, if given, enforces the soft time
    limit: ``limiter.arm(task)`` just before the task's code, ``limiter.disarm()`` just after (SIGALRM in a prefork
    child, the worker's watchdog in the threads pool)."""
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
                          kwargs=job.get("kwargs", {}), called_directly=False, lease_id=job.get("lease_id"))
    task._push_request(request)
    try:
        outcome = _run(broker, job, task, request, limiter)
    finally:
        if limiter is not None:
            # Again, in case the limit struck while the first disarm began: a limit armed after the task must
            # not strike the worker's own code.
            limiter.disarm()
        task._pop_request()
    # A progress report learned the task was revoked: whatever it did next, its outcome is discarded.
    return {"ok": False, "revoked": True} if request.revoked else outcome


def _run(broker, job, task, request, limiter):
    """Calls the task inside its contexts; returns its outcome map."""
    name = job["task"]
    retries = request.retries
    try:
        with tracing.continued(job.get("context"), name, job["id"], job.get("queue"), job.get("attempt", 1)), \
                flask_context.task_context(broker.flask_app, job.get("context"), broker.g_loaders):
            if limiter is not None:
                limiter.arm(task)
            try:
                result = task(*job.get("args", []), **job.get("kwargs", {}))
                if inspect.isawaitable(result):  # an `async def` task: run it on this thread's event loop
                    result = _run_coroutine(result)
            finally:
                if limiter is not None:
                    limiter.disarm()
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


#: The shared counters' slots (a ``multiprocessing.RawArray("q", 4)`` per child): tasks claimed, tasks done, the
#: number below which the child may claim, and when the child claimed its latest task (``time.monotonic()`` in
#: ms: a clock every process of the machine shares), for the parent to enforce hard time limits.
STARTED, SETTLED, LIMIT, STARTED_AT = 0, 1, 2, 3
NO_LIMIT = 1 << 62


def monotonic_ms():
    return int(time.monotonic() * 1000)


class _AlarmLimiter:
    """The soft time limit in a prefork child, which runs tasks on its main thread: a one-shot SIGALRM timer whose
    handler raises SoftTimeLimitExceeded in the task. (The hard limit is the parent's: it kills the child.)"""

    def __init__(self, defaults):
        self.defaults = defaults
        self.armed = None  # the soft limit in seconds while a task runs under one
        signal.signal(signal.SIGALRM, self._expired)

    def arm(self, task):
        soft, _hard = time_limits(task, self.defaults)
        if soft:
            self.armed = soft
            signal.setitimer(signal.ITIMER_REAL, soft)

    def disarm(self):
        if self.armed is not None:
            self.armed = None
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _expired(self, _signum, _frame):
        # Only while the task runs: a signal already on its way when the task ended is dropped. The timer fires
        # once, so nothing comes after this.
        soft, self.armed = self.armed, None
        if soft is not None:
            raise SoftTimeLimitExceeded(f"the task ran past its soft time limit ({soft}s)")


def child_main(pipe_in, pipe_out, app_spec, url, parent_pid, counters, claim, log_setup, time_limit_defaults):
    """The child process's entry point: load the app, then run what the parent hands it until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    level, fmt = log_setup
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)
    try:
        broker = load_broker(app_spec)
        if url:
            broker.url = url
    except BaseException:
        pipe_out.send_bytes(serialization.packb({"fatal": traceback.format_exc()}))
        return
    pipe_out.send_bytes(serialization.packb({"ready": True}))
    _Child(broker, pipe_in, pipe_out, counters, claim, _AlarmLimiter(time_limit_defaults)).run()


class _Child:
    """The child's loop: one thread reads the parent's messages, runs tasks and reads the daemon's replies."""

    def __init__(self, broker, pipe_in, pipe_out, counters, claim, limiter):
        self.broker = broker
        self.limiter = limiter
        self.conn = broker.connection()
        self.pipe = pipe_in
        self.pipe_out = pipe_out
        self.counters = counters
        self.claim = claim
        self.waiting = collections.deque()  # (task, last of its batch), in hand-off order
        self.revoked = set()
        self.closed = False

    def run(self):
        while not (self.closed and not self.waiting):
            self._read_messages(block=not self.waiting)
            if self.waiting:
                self._next()
        self.conn.drain(timeout=5)  # the replies still on their way, for their log lines

    def _read_messages(self, block):
        """Takes the parent's messages that have arrived and the daemon's replies; with `block`, waits for one of
        them first."""
        while True:
            fds = [self.pipe.fileno()]
            sock = self.conn.fileno()
            if sock is not None:
                fds.append(sock)
            ready, _, _ = select.select(fds, [], [], None if block and not self.closed else 0)
            if sock is not None and sock in ready:
                self.conn.drain()
            if fds[0] not in ready:
                if ready and block:
                    continue  # only replies: keep waiting for the parent
                return
            try:
                message = serialization.unpackb(self.pipe.recv_bytes())
            except (EOFError, OSError):
                self.closed = True
                return
            if "batch" in message:
                batch = message["batch"]
                self.waiting.extend((job, i == len(batch) - 1) for i, job in enumerate(batch))
            elif "revoke" in message:
                self.revoked.add(message["revoke"])
            block = False

    def _next(self):
        job, last = self.waiting.popleft()
        counters = self.counters
        seq = counters[SETTLED]  # tasks are done in order: this one's number
        with self.claim:
            mine = seq < counters[LIMIT]
            if mine:
                counters[STARTED_AT] = monotonic_ms()
                counters[STARTED] = seq + 1
        if not mine:
            pass  # the parent took it back (a shutdown) and releases it
        elif self.closed:
            outcomes.release(self.conn, job, "not started: the worker stopped")
        elif job["id"] in self.revoked:
            self.revoked.discard(job["id"])
            outcomes.settle_revoked(self.conn, job)
        else:
            started = time.monotonic()
            outcome = run_job(self.broker, job, self.limiter)
            outcomes.settle(self.conn, job, outcome, time.monotonic() - started)
        counters[SETTLED] = seq + 1
        if last and not self.closed:
            try:
                self.pipe_out.send_bytes(serialization.packb({"done": seq + 1}))
            except OSError:
                self.closed = True

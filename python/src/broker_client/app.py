"""The producer side, shaped like Celery's: ``Broker`` (the app), ``@broker.task``, ``Task.delay``/``apply_async``
and ``AsyncResult``.

``Broker`` owns the task registry, the settings (from its arguments, or from a Flask ``app.config`` via
``init_app``), the periodic tasks it declares (:mod:`broker_client.schedules`) and one lazily opened
:class:`~broker_client.connection.Connection` per process. A ``Task`` turns a call into a protocol ``TaskSpec``
(checking first that every argument is plain data) and sends ``enqueue``; it never runs anything itself except when
called directly, like a plain function. Running tasks is the worker's job (:mod:`broker_client.worker`); workflows
(``task.s()``, chains, groups, chords) are :mod:`broker_client.canvas`'s.
"""

import asyncio
import datetime
import functools
import inspect
import logging
import os
import threading
import time
import warnings

from . import canvas, flask_context, schedules, tracing
from .connection import DEFAULT_URL, Connection
from .errors import (
    BrokerError,
    ConnectionLost,
    MaxRetriesExceededError,
    NotFound,
    Retry,
    SerializationError,
    TaskRevokedError,
    TimeoutError,
    remote_exception,
)
from .serialization import check_arguments, check_value

DEFAULT_QUEUE = "default"
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
#: Celery's default delay for ``self.retry()`` without a countdown: three minutes.
DEFAULT_RETRY_DELAY = 180
#: The longest wait one ``get`` request asks the daemon for; longer waits loop.
_MAX_WAIT_MS = 300_000
#: ``max_retries=None`` in Celery means "retry forever"; the protocol needs a number.
_FOREVER = 2**32 - 1
#: Tasks per enqueue_batch request in delay_many (the daemon accepts up to max_enqueue_batch, 10,000 by default).
_BATCH = 1000
#: How long one wait of ``aget`` holds an executor thread (it waits again until the task finishes or times out).
_AGET_SLICE = 0.25

_log = logging.getLogger("broker_client.worker")


def _is_flask_app(obj):
    return hasattr(obj, "config") and hasattr(obj, "extensions") and hasattr(obj, "test_request_context")


class Settings(dict):
    """``broker.conf``, shaped like Celery's ``app.conf``: a dict whose keys also read and write as attributes. The
    broker reads ``beat_schedule`` (periodic tasks, see ``Broker.sync_schedules``) and ``timezone`` (the one
    their cron schedules are read in when they name none; UTC if None)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"conf has no {key!r}") from None

    def __setattr__(self, key, value):
        self[key] = value


class Broker:
    """The app object: ``broker = Broker("tcp://127.0.0.1:7420")`` or ``Broker(flask_app)`` / ``init_app``.

    The URL is looked up when the first connection opens: the ``url`` given here, else the Flask app's
    ``BROKER_URL``, else the ``BROKER_URL`` environment variable, else ``tcp://127.0.0.1:7420``. Several daemons
    over one shared store: a comma-separated list, ``tcp://:TOKEN@a:7420,b:7420`` (the scheme and token once),
    tried in turn; a call after one of them stopped or answered ``store_unavailable`` goes to the next.
    ``include`` lists modules the worker imports so their tasks are registered.
    """

    def __init__(self, app_or_url=None, *, url=None, include=(), default_queue=None, client_name=None):
        self.tasks = {}
        self.flask_app = None
        self.include = list(include)
        self.default_queue = default_queue
        self.client_name = client_name
        self.context_settings = flask_context.ContextSettings()
        self.g_dumpers = {}
        self.g_loaders = {}
        self.conf = Settings(beat_schedule={}, timezone=None)
        self._periodic = {}  # schedule name → (signature, schedule, timezone, catch_up), from the code
        self._url = url
        self._connection = None
        self._connection_lock = threading.Lock()
        if isinstance(app_or_url, str):
            self._url = app_or_url
        elif app_or_url is not None:
            self.init_app(app_or_url)

    # -- configuration ---------------------------------------------------------------------------------------

    def init_app(self, app):
        """Binds a Flask app: settings come from ``app.config``, tasks run inside its contexts in the worker."""
        if not _is_flask_app(app):
            raise TypeError(f"init_app expects a Flask app, got {type(app).__name__}")
        self.flask_app = app
        app.extensions["broker"] = self
        self.context_settings = flask_context.ContextSettings(app.config)
        if self.default_queue is None:
            self.default_queue = app.config.get("BROKER_DEFAULT_QUEUE")
        self.include += [m for m in app.config.get("BROKER_INCLUDE", []) if m not in self.include]
        return self

    @property
    def url(self):
        if self._url:
            return self._url
        if self.flask_app is not None and self.flask_app.config.get("BROKER_URL"):
            return self.flask_app.config["BROKER_URL"]
        return os.environ.get("BROKER_URL") or DEFAULT_URL

    @url.setter
    def url(self, value):
        self._url = value
        self.close()

    def connection(self):
        """This process's connection (opened on first use, reopened after a fork or a failure)."""
        with self._connection_lock:
            if self._connection is None or self._connection.url != self.url:
                self._connection = Connection(self.url, client_name=self.client_name)
            return self._connection

    def close(self):
        """Closes the connection; the next call opens a new one."""
        with self._connection_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def g_dumper(self, key):
        """Decorator: converts ``g.<key>`` to plain data when a request's context is captured (e.g. user → id)."""
        def register(fn):
            self.g_dumpers[key] = fn
            return fn
        return register

    def g_loader(self, key):
        """Decorator: turns the plain data back into ``g.<key>`` in the worker (e.g. id → User)."""
        def register(fn):
            self.g_loaders[key] = fn
            return fn
        return register

    # -- tasks -----------------------------------------------------------------------------------------------

    def task(self, fn=None, **options):
        """``@broker.task`` or ``@broker.task(bind=True, name=..., queue=..., max_retries=...,
        default_retry_delay=..., lease_timeout=..., autoretry_for=(...), retry_backoff=..., priority=...,
        rate_limit="100/m", concurrency_limit=..., unique_key=..., unique_for=..., soft_time_limit=...,
        time_limit=...)``."""
        if fn is not None and callable(fn) and not options:
            return self._register(fn, {})
        if fn is not None:
            raise TypeError("use @broker.task or @broker.task(option=...), with keyword options only")
        return lambda f: self._register(f, options)

    def _register(self, fn, options):
        task = Task(self, fn, **options)
        self.tasks[task.name] = task
        return task

    def send_task(self, name, args=None, kwargs=None, **options):
        """Enqueues a task by name (it need not be registered in this process), like Celery's ``send_task``."""
        return Task(self, None, name=name).apply_async(args, kwargs, **options)

    def signature(self, name, args=None, kwargs=None, options=None, **extra_options):
        """A signature of the task `name` (it need not be registered in this process), for workflows: Celery's
        ``app.signature("tasks.add", args=(2, 2), countdown=10)``."""
        return canvas.signature(name, args, kwargs, options, app=self, **extra_options)

    def _task_for(self, name):
        """The task registered under `name`, else one that only knows its name (as ``send_task`` uses)."""
        return self.tasks.get(name) or Task(self, None, name=name)

    def AsyncResult(self, task_id, parent=None, task_name=None):  # noqa: N802 - Celery's spelling
        """A handle on an existing task (`parent`: the result of the task it follows in a chain, if known)."""
        return AsyncResult(task_id, self, task_name=task_name, parent=parent)

    def stats(self):
        """The daemon's counters (the ``stats`` op)."""
        return self.connection().call("stats")

    def purge(self, queue=None):
        """Deletes the waiting tasks of `queue` (default queue if None); returns how many."""
        queue = queue or self.default_queue or DEFAULT_QUEUE
        return self.connection().call("purge", queue=queue)["purged"]

    def pause(self, queue):
        """Stops every worker from leasing `queue`'s tasks until ``resume`` (the daemon holds it, across restarts;
        enqueues are still taken, running tasks finish). Returns whether it was paused already."""
        return self.connection().call("pause", queue=queue)["was_paused"]

    def resume(self, queue):
        """Lets workers lease `queue`'s tasks again; returns whether it was paused."""
        return self.connection().call("resume", queue=queue)["was_paused"]

    def set_limit(self, task=None, queue=None, rate=None, concurrency=None):
        """Limits the tasks of one name (`task`) or of one `queue` (give exactly one), for every worker together:
        `rate` starts per second, minute or hour (``"100/m"``, ``"10/s"``, ``"5/h"``; a number is per second),
        `concurrency` running at once. It replaces that name's limit whole; neither `rate` nor `concurrency`
        removes it."""
        if (task is None) == (queue is None):
            raise ValueError("set_limit: give task= or queue=, not both and not neither")
        fields = {"scope": "task", "name": task} if task is not None else {"scope": "queue", "name": queue}
        if rate is not None:
            fields["rate"] = str(rate)
        if concurrency is not None:
            fields["concurrency"] = int(concurrency)
        self.connection().call("set_limit", **fields)

    def limits(self):
        """The limits the daemon holds: dicts with ``scope`` (``"task"`` or ``"queue"``), ``name``, ``rate`` and
        ``concurrency`` (absent when not set) and ``running`` (leases they cover now)."""
        return self.connection().call("limits")["limits"]

    # -- periodic tasks --------------------------------------------------------------------------------------

    def periodic_task(self, *, cron=None, every=None, timezone=None, args=(), kwargs=None, catch_up=None,
                      **options):
        """``@broker.periodic_task(every=30)`` or ``@broker.periodic_task(cron="*/5 * * * *",
        timezone="Europe/Paris")``: registers the function as ``@broker.task(**options)`` does (``name=``,
        ``queue=``, ``bind=``...) and declares a schedule named after the task, which enqueues it with `args` and
        `kwargs` every `every` seconds (a number or a timedelta) or at the times of `cron`. `catch_up`: the ticks
        missed while the daemon was down fire "once" (the default) or are skipped ("skip")."""
        if (cron is None) == (every is None):
            raise ValueError("periodic_task: give cron= or every=, one of them")

        def register(fn):
            task = self._register(fn, options)
            self.add_periodic_task(every if cron is None else cron, task.s(*args, **(kwargs or {})), name=task.name,
                                   timezone=timezone, catch_up=catch_up)
            return task
        return register

    def add_periodic_task(self, schedule, sig, name=None, *, timezone=None, catch_up=None):
        """Declares a periodic task, as Celery's ``app.add_periodic_task(10.0, add.s(2, 3), name="add every 10")``:
        `schedule` is seconds (a number or a timedelta), a ``crontab(...)`` or a cron string; `sig` a signature
        (``task.s(...)``, or ``broker.signature("name", ...)`` for a task registered elsewhere), whose options
        (queue, priority, expires...) every tick's task takes. `name` names the schedule (default: the task's
        name). `timezone` is the one cron fields are read in (default ``conf.timezone``, else UTC); `catch_up` is
        "once" (the default) or "skip". The daemon has it once it is synced (``sync_schedules``: every worker does
        it at start)."""
        name = name or sig.name
        entry = (sig, schedule, timezone, catch_up)
        if self._periodic.get(name, entry) != entry:
            raise ValueError(f"two periodic tasks are named {name!r}: give each its own name=")
        self._periodic[name] = entry

    def sync_schedules(self):
        """Sends the daemon every schedule the app declares (``periodic_task``, ``add_periodic_task`` and
        ``conf.beat_schedule``), adding or changing it (``schedule_add``). The same definition again changes
        nothing there (its ticks go on), so every worker does this at start. Schedules the app no longer declares
        are left in the daemon: remove them with ``remove_schedule``. Every schedule is checked before any is sent;
        returns the daemon's view of each (as ``schedules()``)."""
        definitions = [self._schedule_definition(name, *entry) for name, entry in self._declared_schedules().items()]
        return [self._add_schedule(definition) for definition in definitions]

    def schedules(self):
        """Every schedule the daemon keeps, by name: dicts with ``name``, ``task`` (the spec each tick enqueues),
        ``cron`` and ``timezone`` or ``every_ms``, ``catch_up``, ``paused``, ``next_ms`` (absent while paused) and
        ``last_ms`` (the latest tick fired; absent before the first). Needs an ``admin`` token."""
        return self.connection().call("schedules")["schedules"]

    def remove_schedule(self, name):
        """Deletes a schedule from the daemon (the tasks it enqueued stay); returns whether there was one. A worker
        whose app still declares it adds it back when it starts."""
        return self.connection().call("schedule_remove", name=name)["removed"]

    def pause_schedule(self, name):
        """Stops a schedule's ticks until ``resume_schedule`` (ticks that fall meanwhile never fire); returns the
        schedule. Raises NotFound if the daemon has none of that name."""
        return self.connection().call("schedule_pause", name=name)

    def resume_schedule(self, name):
        """Lets a paused schedule tick again, from its next tick after now; returns the schedule."""
        return self.connection().call("schedule_resume", name=name)

    def _declared_schedules(self):
        """Name → (signature, schedule, timezone, catch_up) of every schedule the app declares."""
        declared = dict(self._periodic)
        for name, entry in (self.conf.get("beat_schedule") or {}).items():
            if name in declared:
                raise ValueError(f"schedule {name!r} is declared twice: in conf.beat_schedule and by "
                                 f"periodic_task/add_periodic_task")
            entry = schedules.beat_entry(name, entry)
            sig = self.signature(entry["task"], entry["args"], entry["kwargs"], entry["options"])
            declared[name] = (sig, entry["schedule"], entry["timezone"], entry["catch_up"])
        return declared

    def _schedule_definition(self, name, sig, schedule, timezone, catch_up):
        """The ``schedule_add`` request of one declared schedule."""
        try:
            spec = sig._spec(self, {}, False)
            if "id" in spec:
                raise ValueError("a periodic task takes no task_id: each tick's task is named sched:<name>:<tick>")
            fields = schedules.timing(schedule, timezone, self.conf.get("timezone"))
        except (TypeError, ValueError) as e:
            raise type(e)(f"schedule {name!r}: {e}") from None
        # A tick comes from no request and no trace; and a context captured now would make every sync a new
        # definition, restarting the schedule.
        spec.pop("context", None)
        definition = {"name": name, "task": spec, **fields}
        if catch_up is not None:
            definition["catch_up"] = catch_up
        return definition

    def _add_schedule(self, definition):
        try:
            return self.connection().call("schedule_add", **definition)
        except BrokerError as e:
            raise BrokerError(e.code, f"schedule {definition['name']!r}: {e.message}", e.op) from None


class TaskRequest:
    """``self.request`` inside a bound task: what the worker knows about the current attempt."""

    def __init__(self, id=None, retries=0, max_retries=None, queue=None, task=None, context=None,
                 args=(), kwargs=None, called_directly=True, lease_id=None):
        self.id = id
        self.retries = retries
        self.max_retries = max_retries
        self.queue = queue
        self.task = task
        self.context = context or {}
        #: The W3C traceparent of the trace the task was enqueued in, if any (see broker_client.tracing).
        self.traceparent = tracing.traceparent(self.context)
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.called_directly = called_directly
        #: The lease this attempt runs under, which ``update_state`` quotes to the daemon.
        self.lease_id = lease_id
        #: Set when a progress report learned that the task was revoked: the worker ends it REVOKED.
        self.revoked = False

    def __repr__(self):
        return f"<TaskRequest {self.task}[{self.id}] retries={self.retries}>"


class Task:
    """A registered task. Call it to run it here; ``delay``/``apply_async`` to run it in a worker.

    ``rate_limit`` and ``concurrency_limit`` are declared to the daemon by each worker that starts (``set_limit``)
    and hold for every worker together. ``unique_key`` (a string, or a function of ``(args, kwargs)`` returning one,
    or None for no key) makes enqueues of a key that is held return the task holding it; ``unique_for`` (seconds)
    holds the key for that long instead of until the task finishes. ``soft_time_limit`` and ``time_limit``
    (seconds) override the worker's ``--soft-time-limit`` and ``--time-limit``.
    """

    def __init__(self, broker, fn, *, name=None, bind=False, queue=None, max_retries=3,
                 default_retry_delay=DEFAULT_RETRY_DELAY, lease_timeout=None, autoretry_for=(),
                 retry_backoff=False, retry_backoff_max=600, priority=0, expires=None, result_ttl=None,
                 rate_limit=None, concurrency_limit=None, unique_key=None, unique_for=None, soft_time_limit=None,
                 time_limit=None):
        if unique_for is not None and unique_key is None:
            raise ValueError("unique_for needs a unique_key")
        self.broker = broker
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.bind = bind
        self.queue = queue
        self.max_retries = max_retries
        self.default_retry_delay = default_retry_delay
        self.lease_timeout = lease_timeout
        self.autoretry_for = tuple(autoretry_for)
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.priority = priority
        self.expires = expires
        self.result_ttl = result_ttl
        self.rate_limit = rate_limit
        self.concurrency_limit = concurrency_limit
        self.unique_key = unique_key
        self.unique_for = unique_for
        self.soft_time_limit = soft_time_limit
        self.time_limit = time_limit
        self._local = threading.local()
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __repr__(self):
        return f"<Task {self.name}>"

    @property
    def request(self):
        request = getattr(self._local, "request", None)
        return request if request is not None else TaskRequest(task=self.name, max_retries=self.max_retries)

    def _push_request(self, request):
        self._local.request = request

    def _pop_request(self):
        self._local.request = None

    def __call__(self, *args, **kwargs):
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def delay(self, *args, **kwargs):
        """Enqueues the task with these arguments; returns an AsyncResult."""
        return self.apply_async(args, kwargs)

    def s(self, *args, **kwargs):
        """A signature of this call, as Celery's ``task.s()``: for chains, groups and chords, or to enqueue later.
        As a chain's link or a chord's callback it receives the previous result as its first argument."""
        return canvas.Signature(self, args, kwargs)

    def si(self, *args, **kwargs):
        """An immutable signature, as Celery's ``task.si()``: as a chain's link or a chord's callback it does not
        receive the previous result."""
        return canvas.Signature(self, args, kwargs, immutable=True)

    def apply_async(self, args=None, kwargs=None, **options):
        """Enqueues the task. Options: ``countdown`` in seconds; ``eta`` a datetime (naive = local time) or Unix
        seconds; ``expires`` seconds from now or a datetime; ``priority``, ``task_id``, ``queue``,
        ``max_retries``, ``lease_timeout``, ``result_ttl``; ``unique_key`` and ``unique_for`` (seconds) as the
        decorator's. Raises SerializationError if an argument is not plain data. While another task holds the
        unique key, nothing is enqueued and the result is that task's."""
        reply = self.broker.connection().call("enqueue", task=self._spec(args, kwargs, **options))
        return AsyncResult(reply["id"], self.broker, task_name=self.name)

    async def delay_async(self, *args, **kwargs):
        """``delay`` for asyncio code (FastAPI, Quart...): the request runs on a worker thread
        (``asyncio.to_thread``, which carries the current context along), so the event loop never blocks."""
        return await asyncio.to_thread(self.apply_async, args, kwargs)

    def delay_many(self, arguments, **options):
        """Enqueues one task per item of `arguments` (a tuple or list: the positional arguments; a dict: the keyword
        arguments), with one durable write per 1,000 tasks (``enqueue_batch``) instead of one per task. Takes
        ``apply_async``'s options, for every task. Every item is checked before any is sent; returns the
        AsyncResults in order."""
        if options.get("task_id") is not None:
            raise ValueError("delay_many: task_id would name every task; leave it out")
        specs = []
        for item in arguments:
            if isinstance(item, dict):
                specs.append(self._spec((), item, **options))
            else:
                specs.append(self._spec(item, None, **options))
        results = []
        for start in range(0, len(specs), _BATCH):
            reply = self.broker.connection().call("enqueue_batch", tasks=specs[start:start + _BATCH])
            results.extend(AsyncResult(t["id"], self.broker, task_name=self.name) for t in reply["tasks"])
        return results

    def _spec(self, args, kwargs, *, receives_result=False, countdown=None, eta=None, priority=None, task_id=None,
              queue=None, expires=None, max_retries=None, lease_timeout=None, result_ttl=None, unique_key=None,
              unique_for=None):
        """The enqueue spec of one call (see ``apply_async``); `receives_result`: it is a chain's link or a chord's
        callback, which the daemon calls with the previous result first."""
        args = list(args or ())
        kwargs = dict(kwargs or {})
        check_arguments(self.name, args, kwargs)
        spec = {"task": self.name, "args": args, "kwargs": kwargs}
        if self.fn is not None:
            self._check_signature(args, kwargs, receives_result)
        queue = queue or self.queue or self.broker.default_queue
        if queue:
            spec["queue"] = queue
        if task_id:
            spec["id"] = str(task_id)
        priority = self.priority if priority is None else priority
        if priority:
            spec["priority"] = int(priority)
        if countdown is not None and eta is not None:
            raise ValueError("give countdown or eta, not both")
        if countdown is not None:
            spec["countdown_ms"] = max(0, int(countdown * 1000))
        if eta is not None:
            spec["eta_ms"] = _unix_ms(eta)
        expires = self.expires if expires is None else expires
        if isinstance(expires, (datetime.datetime, datetime.date)):
            spec["expires_at_ms"] = _unix_ms(expires)
        elif expires is not None:
            spec["expires_in_ms"] = max(0, int(expires * 1000))
        max_retries = self.max_retries if max_retries is None else max_retries
        spec["max_retries"] = _FOREVER if max_retries is None else int(max_retries)
        if self.retry_backoff:
            first = self.retry_backoff if self.retry_backoff is not True else 1
            spec["retry_delay_ms"] = int(first * 1000)
            spec["retry_backoff"] = True
            spec["retry_delay_max_ms"] = int(self.retry_backoff_max * 1000)
        else:
            spec["retry_delay_ms"] = int(self.default_retry_delay * 1000)
            spec["retry_backoff"] = False
        lease_timeout = self.lease_timeout if lease_timeout is None else lease_timeout
        if lease_timeout:
            spec["lease_ms"] = max(1, int(lease_timeout * 1000))
        result_ttl = self.result_ttl if result_ttl is None else result_ttl
        if result_ttl is not None:
            spec["result_ttl_ms"] = int(result_ttl * 1000)
        self._unique(spec, args, kwargs, unique_key, unique_for)
        context = {}
        request_context = flask_context.capture(self.broker.context_settings, self.broker.g_dumpers, self.name)
        if request_context is not None:
            context[flask_context.CONTEXT_KEY] = request_context
        trace = tracing.capture()
        if trace is not None:
            context[tracing.CONTEXT_KEY] = trace
        if context:
            spec["context"] = context
        return spec

    def _unique(self, spec, args, kwargs, unique_key, unique_for):
        """Adds the unique key of one call to `spec`: the call's, else the task's (called with the arguments if it
        is a function, which may return None: this call is not unique), and its window likewise."""
        if unique_key is None and unique_for is not None and self.unique_key is None:
            raise ValueError("unique_for needs a unique_key")
        unique_key = self.unique_key if unique_key is None else unique_key
        if callable(unique_key):
            unique_key = unique_key(args, kwargs)
        if unique_key is None:
            return
        spec["unique_key"] = str(unique_key)
        unique_for = self.unique_for if unique_for is None else unique_for
        if unique_for is not None:
            spec["unique_for_ms"] = max(0, int(unique_for * 1000))

    def _check_signature(self, args, kwargs, receives_result=False):
        """Fails at enqueue, not in the worker, when the arguments cannot bind to the function (with a stand-in for
        the previous result, first, if it `receives_result`)."""
        try:
            signature = getattr(self, "_signature", None) or inspect.signature(self.fn)
            self._signature = signature
        except (TypeError, ValueError):
            return
        first = ((self,) if self.bind else ()) + ((None,) if receives_result else ())
        try:
            signature.bind(*first, *args, **kwargs)
        except TypeError as e:
            why = (" (its first argument is the previous task's result; use .si() for a task that takes none)"
                   if receives_result else "")
            raise TypeError(f"{self.name}: {e}{why}") from None

    def retry(self, exc=None, countdown=None, max_retries=None):
        """Inside a bound task: schedule another attempt in `countdown` seconds (default
        ``default_retry_delay``). With no retries left it re-raises `exc` (or MaxRetriesExceededError)."""
        request = self.request
        limit = request.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"{self.name}[{request.id}]: no retries left ({limit})")
        if countdown is None:
            countdown = self.default_retry_delay
        raise Retry(exc, countdown)

    def update_state(self, task_id=None, state="PROGRESS", meta=None):
        """Inside a bound task running in a worker: reports how far it got, as Celery's
        ``self.update_state(state="PROGRESS", meta={"current": 3, "total": 10})``. Until the next report or the
        end of the task, ``AsyncResult.state`` says `state` and ``AsyncResult.info`` gives `meta` (plain data).

        The report goes to the daemon at once, quoting the task's lease, on the connection of the process that
        runs the task. If the daemon answers that the task was revoked, this raises TaskRevokedError: its outcome
        would be discarded, so the task stops here (catch it to clean up) and ends REVOKED. A report the daemon
        cannot take because the lease is gone or the connection broke is logged, not raised: it must not fail the
        work. Called outside a worker (the task called directly) it only warns, so such a task still runs as a
        plain function."""
        request = self.request
        if request.called_directly:
            warnings.warn(f"{self.name}: update_state() outside a worker reports nothing (the task was called "
                          f"directly)", RuntimeWarning, stacklevel=2)
            return
        if task_id is not None and task_id != request.id:
            raise ValueError(f"{self.name}: update_state() reports on the running task only ({request.id}), "
                             f"not {task_id}: the lease it quotes is that task's")
        if state in TERMINAL_STATES:
            raise ValueError(f"{self.name}: update_state(state={state!r}): the task's outcome is what it returns "
                             f"or raises; report progress under a state of your own, e.g. 'PROGRESS'")
        check_value(f"the meta given to {self.name}.update_state()", meta, "be sent as progress")
        try:
            reply = self.broker.connection().call("progress", task_id=request.id, lease_id=request.lease_id,
                                                  state=state, meta=meta)
        except BrokerError as e:
            if e.code != "lease_lost":
                raise  # a bad state name or a meta too large: the caller's to fix
            _log.warning("task %s[%s]: progress not recorded: the lease is gone (%s)", self.name, request.id, e)
            return
        except ConnectionLost as e:
            _log.warning("task %s[%s]: progress not recorded: %s", self.name, request.id, e)
            return
        if reply.get("revoked"):
            request.revoked = True
            raise TaskRevokedError(f"task {request.id} was revoked while running")


def _unix_ms(when):
    if isinstance(when, (int, float)):
        return int(when * 1000)
    if isinstance(when, datetime.datetime):
        return int(when.timestamp() * 1000)
    if isinstance(when, datetime.date):
        return int(datetime.datetime(when.year, when.month, when.day).timestamp() * 1000)
    raise TypeError(f"expected a datetime or Unix seconds, got {type(when).__name__}")


def _progress(info):
    """The progress report of a running task's current attempt, or None. The daemon keeps a task's last report
    through a retry, so a report older than the attempt's start is a previous attempt's."""
    progress = info.get("progress")
    if info["state"] != "STARTED" or progress is None:
        return None
    return progress if progress.get("at_ms", 0) >= info.get("started_at_ms", 0) else None


class AsyncResult:
    """A handle on a task by id: its state, result or error, waiting for it, revoking it.

    Unlike Celery, an id the daemon does not know raises NotFound instead of reading as PENDING forever. The
    exception is a chain's link that is not enqueued yet (the daemon enqueues it when the link before it ends): one
    whose ``parent`` is known (the AsyncResults a chain's ``apply_async`` returns) reads ``PENDING`` until then,
    and waiting for it waits for the links before it.
    """

    def __init__(self, id, broker, task_name=None, parent=None):
        self.id = id
        self.broker = broker
        self.task_name = task_name
        #: The result of the task this one follows in a workflow (a chain's previous link, a chord's GroupResult).
        self.parent = parent
        self._info = None

    def __repr__(self):
        return f"<AsyncResult {self.id}>"

    def __str__(self):
        return self.id

    def _ended(self):
        return self._info is not None and self._info["state"] in TERMINAL_STATES

    def _get(self, wait_ms):
        self._info = self.broker.connection().call("get", task_id=self.id, wait_ms=int(wait_ms))
        return self._info

    def _fetch(self, wait_ms=0):
        if self._ended():
            return self._info
        try:
            return self._get(wait_ms)
        except NotFound:
            if not isinstance(self.parent, AsyncResult):
                raise
        # A chain's link exists from its turn on: wait for the earliest link not known to have ended instead. When
        # it ends, the daemon has enqueued (or ended) the next one in the same commit, so this walks down to self.
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            link = self
            while isinstance(link.parent, AsyncResult) and not link.parent._ended():
                link = link.parent
            info = link._get(max(0, int((deadline - time.monotonic()) * 1000)))
            if link is self:
                return info
            if info["state"] not in TERMINAL_STATES:
                return {"id": self.id, "task": self.task_name, "state": "PENDING"}

    @property
    def info_raw(self):
        """The task as the daemon shows it (``get``): state, attempts, result, error, context..."""
        return self._fetch()

    @property
    def state(self):
        """The task's state; while it runs, the state of its latest progress report if it made one
        (``update_state``, e.g. ``"PROGRESS"``), as Celery's."""
        return self._state_of(self._fetch())

    status = state

    @property
    def result(self):
        """As Celery's: the return value for SUCCESS, the exception for FAILURE (and RETRY), the meta of the latest
        progress report while the task runs, else None."""
        return self._result_of(self._fetch())

    info = result

    def state_and_info(self):
        """``(state, info)`` read in one request. Reading ``.state`` and then ``.info`` makes two, and the task may
        move on in between (a status route could see ``"PROGRESS"`` with the meta of no report, or the final
        result); this pair always describes the same moment."""
        info = self._fetch()
        return self._state_of(info), self._result_of(info)

    @staticmethod
    def _state_of(info):
        progress = _progress(info)
        return progress["state"] if progress is not None else info["state"]

    def _result_of(self, info):
        if info["state"] == "SUCCESS":
            return info.get("result")
        if info["state"] in ("FAILURE", "RETRY") and info.get("error"):
            return self._exception(info)
        progress = _progress(info)
        return progress.get("meta") if progress is not None else None

    @property
    def traceback(self):
        error = self._fetch().get("error") or {}
        return error.get("traceback")

    def ready(self):
        return self._fetch()["state"] in TERMINAL_STATES

    def successful(self):
        return self._fetch()["state"] == "SUCCESS"

    def failed(self):
        return self._fetch()["state"] == "FAILURE"

    async def aget(self, timeout=None, propagate=True):
        """``get`` for asyncio code. It waits in short slices on a worker thread (``asyncio.to_thread``), so many
        awaits at once do not hold the default executor's threads for long."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _AGET_SLICE if deadline is None else max(0.0, min(_AGET_SLICE, deadline - time.monotonic()))
            try:
                return await asyncio.to_thread(self.get, left, propagate)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"task {self.id} did not finish within {timeout}s") from None

    def get(self, timeout=None, propagate=True, interval=None):
        """Waits for the task to finish and returns its result. With `propagate`, a failed task raises its error
        (a TaskFailed named after the remote type, e.g. ``ValueError``) and a revoked one TaskRevokedError.
        Raises broker_client.TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = _MAX_WAIT_MS
            if deadline is not None:
                wait_ms = min(wait_ms, max(0, int((deadline - time.monotonic()) * 1000)))
            info = self._fetch(wait_ms)
            if info["state"] in TERMINAL_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} is still {info['state']} after {timeout}s")
        if info["state"] == "SUCCESS":
            return info.get("result")
        if not propagate:
            return self._exception(info) if info["state"] == "FAILURE" else None
        if info["state"] == "REVOKED":
            error = info.get("error") or {}
            why = f": {error.get('message')}" if error.get("message") else ""
            raise TaskRevokedError(f"task {self.id} was revoked{why}")
        raise self._exception(info)

    def _exception(self, info):
        error = info.get("error") or {}
        return remote_exception(error.get("type", "TaskFailed"), error.get("message", ""),
                                error.get("traceback"), self.id)

    def revoke(self):
        """Revokes the task: it never runs, or (if running) its worker stops it at the next heartbeat."""
        self._info = None
        return self.broker.connection().call("revoke", task_id=self.id)["state"]

    def forget(self):
        """Drops the cached state (Celery's forget also deletes the result; results here expire by TTL)."""
        self._info = None


__all__ = ["Broker", "Task", "TaskRequest", "AsyncResult", "SerializationError", "check_value"]

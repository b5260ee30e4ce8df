"""The exceptions this package raises, in one place so callers can import and match on them.

Errors the daemon sends carry a stable wire code (``not_found``, ``lease_lost``...); :class:`BrokerError` keeps it
in ``.code`` so callers match on the code, never on the message text. A task's own failure comes back from
``AsyncResult.get()`` as a :class:`TaskFailed` whose class is named after the remote exception type (see
:func:`remote_exception`).
"""

import builtins
import importlib


class BrokerError(Exception):
    """The daemon refused a request. ``code`` is the stable wire code from proto.md."""

    def __init__(self, code, message, op=None):
        self.code = code
        self.message = message
        self.op = op
        where = f"{op}: " if op else ""
        super().__init__(f"{where}{message} [{code}]")


class NotFound(BrokerError):
    """No task has that id (never enqueued, purged, or its result expired)."""


class ConnectionLost(ConnectionError):
    """The connection to the daemon closed or could not be opened. The request may or may not have taken effect."""


class StoreUnavailable(BrokerError, ConnectionLost):
    """The daemon answered ``store_unavailable``: it cannot reach its shared store (PostgreSQL). The request may or
    may not have taken effect. Both a :class:`BrokerError` (``code`` is ``"store_unavailable"``) and a
    :class:`ConnectionLost`, so code that retries a lost connection retries this too. With several addresses in
    the URL, the connection is dropped when it comes, and the next call goes to the next daemon of the list."""


class SerializationError(TypeError):
    """A task argument or result cannot be encoded as MessagePack (plain data: None, bool, int, float, str,
    bytes, list, tuple, dict)."""


class TimeoutError(builtins.TimeoutError):  # noqa: A001 - mirrors celery.exceptions.TimeoutError
    """``AsyncResult.get(timeout=...)`` gave up before the task finished."""


class TaskRevokedError(Exception):
    """The task was revoked (or expired) before it finished."""


class NotRegistered(KeyError):
    """A worker received a task name no ``@app.task`` registered."""


class Retry(Exception):
    """Raised by ``self.retry()`` inside a bound task: the worker schedules another attempt.

    Like Celery's ``Retry``, it is meant to be raised (``raise self.retry(...)``) or to propagate out of the task.
    """

    def __init__(self, exc=None, countdown=None):
        self.exc = exc
        self.countdown = countdown
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else "retry requested"
        when = f" in {countdown}s" if countdown is not None else ""
        super().__init__(f"Retry{when}: {detail}")


class MaxRetriesExceededError(Exception):
    """``self.retry()`` was called with no retries left and no ``exc`` to re-raise."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a running task when its ``soft_time_limit`` has passed, so it can clean up (as Celery's
    ``celery.exceptions.SoftTimeLimitExceeded``). Not caught, it fails the task like any exception."""

    def __init__(self, message="the task ran past its soft time limit"):
        super().__init__(message)


class TimeLimitExceeded(Exception):
    """A task ran past its hard ``time_limit`` and was stopped (as Celery's ``celery.exceptions.TimeLimitExceeded``):
    the worker fails it with this type, without retrying. ``AsyncResult.get()`` raises it."""

    def __init__(self, message="the task ran past its time limit"):
        super().__init__(message)


class ChordError(Exception):
    """A chord's callback did not run because one of its members ended FAILURE or REVOKED (as Celery's
    ``celery.exceptions.ChordError``). The daemon fails the callback, and the links chained after it, with this
    type and a message naming the member and its error; ``AsyncResult.get()`` raises it."""


class TaskFailed(Exception):
    """A task failed in a worker. ``type_name``, ``message`` and ``traceback`` are what the worker reported.

    ``AsyncResult.get()`` raises a subclass named after the remote type (``ValueError``, ``myapp.PaymentDeclined``),
    which also derives from the real class when it is a builtin exception or importable, so
    ``except ValueError:`` works as it did when the code ran in-process.
    """

    type_name = "TaskFailed"

    def __init__(self, message="", traceback=None, task_id=None):
        super().__init__(message)
        self.message = message
        self.traceback = traceback
        self.task_id = task_id

    def __str__(self):
        return self.message


_remote_classes = {}

#: Error types the worker or the daemon reports by their bare name (as ``WorkerLostError``), mapped to this
#: package's classes so that ``except TimeLimitExceeded:`` catches them from ``get()``.
_WORKER_ERRORS = {"TimeLimitExceeded": TimeLimitExceeded, "ChordError": ChordError}


def _local_class(type_name):
    """The exception class `type_name` names here, if it is a builtin or can be imported; else None."""
    if "." not in type_name:
        cls = getattr(builtins, type_name, None) or _WORKER_ERRORS.get(type_name)
    else:
        module_name, _, attr = type_name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except Exception:  # an arbitrary import may fail in any way; the name alone still reports the error
            cls = None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, TaskFailed):
        return cls
    return None


def remote_exception(type_name, message, traceback=None, task_id=None):
    """Builds the exception to raise for a task that failed remotely with `type_name` and `message`."""
    cls = _remote_classes.get(type_name)
    if cls is None:
        short = type_name.rpartition(".")[2] or "TaskFailed"
        local = _local_class(type_name)
        bases = (TaskFailed, local) if local is not None else (TaskFailed,)
        try:
            cls = type(short, bases, {"type_name": type_name, "__init__": TaskFailed.__init__,
                                      "__str__": TaskFailed.__str__})
        except TypeError:  # layout conflict between the bases (rare C extension types)
            cls = type(short, (TaskFailed,), {"type_name": type_name})
        cls.__module__ = type_name.rpartition(".")[0] or "builtins"
        _remote_classes[type_name] = cls
    exc = cls.__new__(cls)
    TaskFailed.__init__(exc, message, traceback, task_id)
    if traceback and hasattr(exc, "add_note"):
        exc.add_note(f"Remote traceback (task {task_id}):\n{traceback.rstrip()}")
    return exc

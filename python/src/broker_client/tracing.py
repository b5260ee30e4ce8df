"""W3C trace context carried with a task: the producer's current trace goes into the task's protocol ``context``
under ``"trace"`` (``{"traceparent": ..., "tracestate": ...}``), and the worker continues it around the task.

With OpenTelemetry in the app (``opentelemetry-api``; optional), the producer injects its current span and the
worker extracts it, makes it current, and runs the task in a ``CONSUMER`` span ``run <task name>`` (recorded when
the app has an SDK tracer provider), so the task's own spans and logs join the request's trace. Without it, a
``traceparent`` header of the Flask request being served is carried as is. Either way ``self.request.traceparent``
gives it to the task.
"""

import contextlib
import functools

CONTEXT_KEY = "trace"


@functools.lru_cache(maxsize=None)
def _otel():
    """OpenTelemetry's (context, propagate, trace) modules, or None without it (looked up once: a failed import
    costs a search of sys.path every time)."""
    try:
        from opentelemetry import context, propagate, trace
    except ImportError:
        return None
    return context, propagate, trace


@functools.lru_cache(maxsize=None)
def _flask():
    """Flask's (has_request_context, request), or None without it (looked up once, as `_otel`)."""
    try:
        from flask import has_request_context, request
    except ImportError:
        return None
    return has_request_context, request


def capture():
    """The current trace as a carrier dict, or None when there is none."""
    otel = _otel()
    if otel is not None:
        propagate = otel[1]
        carrier = {}
        propagate.inject(carrier)
        if carrier.get("traceparent"):
            return {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")}
    flask = _flask()
    if flask is None:
        return None
    has_request_context, request = flask
    if has_request_context() and request.headers.get("traceparent"):
        carrier = {"traceparent": request.headers["traceparent"]}
        if request.headers.get("tracestate"):
            carrier["tracestate"] = request.headers["tracestate"]
        return carrier
    return None


def traceparent(context):
    """The ``traceparent`` a task's context carries, or None."""
    carrier = (context or {}).get(CONTEXT_KEY)
    return carrier.get("traceparent") if isinstance(carrier, dict) else None


@contextlib.contextmanager
def continued(context, task_name, task_id, queue, attempt):
    """Runs the body inside the trace the task carries (a no-op without one or without OpenTelemetry)."""
    carrier = (context or {}).get(CONTEXT_KEY)
    otel = _otel()
    if otel is None or not isinstance(carrier, dict) or not carrier.get("traceparent"):
        yield
        return
    otel_context, propagate, trace = otel
    parent = propagate.extract(carrier)
    token = otel_context.attach(parent)
    try:
        tracer = trace.get_tracer("broker_client")
        span = tracer.start_span(f"run {task_name}", context=parent, kind=trace.SpanKind.CONSUMER,
                                 attributes={"messaging.system": "broker", "messaging.message.id": task_id,
                                             "messaging.destination.name": queue or "",
                                             "broker.task": task_name, "broker.attempt": attempt})
        if span.get_span_context().is_valid:
            with trace.use_span(span, end_on_exit=True):
                yield
        else:  # no SDK: the remote parent stays current, so the task still sees the trace
            yield
    finally:
        otel_context.detach(token)

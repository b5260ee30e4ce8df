"""Carrying a Flask request into a task: capture it at enqueue time, rebuild it in the worker.

At ``.delay()`` inside a request, :func:`capture` records the request's path, root URL, method, query string,
the headers the settings let through, and the configured ``g`` keys, under the key ``"flask"`` of the task's
protocol ``context``. The daemon stores it with the task (in its data directory, on disk) and hands it unchanged
to every attempt. In the worker, :func:`task_context` rebuilds it with ``app.test_request_context(...)`` and puts
the ``g`` values back, so ``request.path``, ``request.args``, ``request.headers``, ``url_for(..., _external=True)``
and ``g.user`` answer as they did in the view. No ``before_request`` hook runs in the worker: only what was
captured comes back.

Flask is imported lazily: the package works without it.
"""

import contextlib

from .errors import SerializationError
from .serialization import check_value

CONTEXT_KEY = "flask"

#: Headers that never travel: the body does not travel, so its length would lie.
_ALWAYS_DROPPED = {"content-length"}

#: Headers that travel by default: harmless ones a task may want (who asked, in which language, which request).
#: Anything else, API keys and tokens in custom headers included, stays out of the daemon's disk unless listed.
DEFAULT_HEADERS_ALLOW = ["User-Agent", "Accept", "Accept-Language", "Content-Type", "X-Request-Id",
                         "X-Correlation-Id", "traceparent", "tracestate"]
DEFAULT_HEADERS_DENY = ["Authorization", "Cookie", "Proxy-Authorization"]
DEFAULT_G_KEYS = ["user"]


class ContextSettings:
    """What travels: read from ``app.config`` by ``Broker.init_app``.

    ``BROKER_CONTEXT_HEADERS``: the header names that travel (default :data:`DEFAULT_HEADERS_ALLOW`); ``"*"`` lets
    every header through except the deny list. ``BROKER_CONTEXT_HEADERS_DENY``: names that never travel, even if
    allowed (default Authorization, Cookie, Proxy-Authorization). ``BROKER_CONTEXT_G_KEYS``: the ``g`` attributes to carry (default ``["user"]``, when
    set). ``BROKER_CONTEXT_ENABLED``: False turns capture off.
    """

    def __init__(self, config=None):
        config = config or {}
        allow = config.get("BROKER_CONTEXT_HEADERS", DEFAULT_HEADERS_ALLOW)
        if isinstance(allow, str) and allow != "*":
            allow = [allow]
        self.headers_allow = None if allow == "*" else {h.lower() for h in allow}
        self.headers_deny = {h.lower() for h in config.get("BROKER_CONTEXT_HEADERS_DENY", DEFAULT_HEADERS_DENY)}
        self.g_keys = list(config.get("BROKER_CONTEXT_G_KEYS", DEFAULT_G_KEYS))
        self.enabled = bool(config.get("BROKER_CONTEXT_ENABLED", True))

    def header_travels(self, name):
        low = name.lower()
        if low in _ALWAYS_DROPPED or low in self.headers_deny:
            return False
        return self.headers_allow is None or low in self.headers_allow


def capture(settings, g_dumpers, task_name):
    """The context of the active request as a plain dict, or None outside a request (or without Flask)."""
    if not settings.enabled:
        return None
    try:
        from flask import g, has_request_context, request
    except ImportError:
        return None
    if not has_request_context():
        return None
    g_values = {}
    for key in settings.g_keys:
        if key not in g:
            continue
        value = getattr(g, key)
        dumper = g_dumpers.get(key)
        if dumper is not None:
            value = dumper(value)
        try:
            check_value(f"g.{key} (carried into {task_name} from the request)", value, "be sent to a task")
        except SerializationError as e:
            raise SerializationError(
                f"{e}. Register a converter with @broker.g_dumper({key!r}) and @broker.g_loader({key!r}), "
                f"or remove {key!r} from BROKER_CONTEXT_G_KEYS"
            ) from None
        g_values[key] = value
    return {
        "path": request.path,
        "base_url": request.root_url,
        "method": request.method,
        "query_string": request.query_string.decode("latin-1"),
        "headers": [[k, v] for k, v in request.headers.items() if settings.header_travels(k)],
        "remote_addr": request.remote_addr,
        "g": g_values,
    }


@contextlib.contextmanager
def task_context(flask_app, context, g_loaders):
    """Runs the body in a rebuilt request context if `context` holds one, else in a plain app context."""
    if flask_app is None:
        yield
        return
    captured = (context or {}).get(CONTEXT_KEY)
    if not captured:
        with flask_app.app_context():
            yield
        return
    from flask import g

    environ = {"REMOTE_ADDR": captured["remote_addr"]} if captured.get("remote_addr") else None
    with flask_app.test_request_context(
        captured.get("path", "/"),
        base_url=captured.get("base_url"),
        method=captured.get("method", "GET"),
        query_string=captured.get("query_string", ""),
        headers=[tuple(h) for h in captured.get("headers", [])],
        environ_base=environ,
    ):
        for key, value in (captured.get("g") or {}).items():
            loader = g_loaders.get(key)
            setattr(g, key, loader(value) if loader is not None else value)
        yield

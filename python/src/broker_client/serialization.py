"""MessagePack encoding of frames, task arguments and results, and the errors that name what cannot be sent.

Everything that crosses the wire is plain data: None, bool, int (64-bit), float, str, bytes, list/tuple and dict.
When something else slips in (an ORM object, a datetime, a set), the encoder fails, and this module finds *which*
argument and where inside it, so the error says e.g. "argument 'user' (keyword) of send_email is of type User".
It never guesses a conversion: silently turning an object into something else is how tasks end up acting on
stale data.
"""

import msgpack

from .errors import SerializationError

_PLAIN = (type(None), bool, int, float, str, bytes, bytearray)


def packb(value):
    """Encodes one value (a frame body, a result) as MessagePack."""
    return msgpack.packb(value, use_bin_type=True)


def unpackb(data):
    """Decodes one MessagePack value; maps may have non-string keys (task data can)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _find_bad(value, path=""):
    """The first value inside `value` msgpack cannot encode, as (path, value); None if it all encodes."""
    if isinstance(value, bool) or value is None or isinstance(value, (float, str, bytes, bytearray)):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else (path, value)
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _find_bad(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_bad(key, f"{path} (a key)") if not isinstance(key, (str, int, bytes)) else None
            if found:
                return found
            found = _find_bad(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    return (path, value)


def _describe(value):
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, int):
        return f"an integer out of the 64-bit range ({value})"
    return f"of type {name}"


def _hint(value):
    kind = type(value).__name__
    if kind in ("datetime", "date", "time"):
        return "pass plain data instead (e.g. value.isoformat() or a Unix timestamp)"
    if kind in ("Decimal", "UUID"):
        return "pass plain data instead (e.g. str(value))"
    if isinstance(value, (set, frozenset)):
        return "pass plain data instead (e.g. a sorted list)"
    if isinstance(value, int):
        return "pass plain data instead (e.g. str(value))"
    return "pass plain data (e.g. the object's id) instead, and load the object inside the task"


def check_arguments(task_name, args, kwargs):
    """Raises SerializationError naming the first argument (position or keyword) that cannot be encoded."""
    items = [(f"{i} (positional)", v) for i, v in enumerate(args)]
    items += [(f"{k!r} (keyword)", v) for k, v in kwargs.items()]
    for label, value in items:
        found = _find_bad(value)
        if found:
            path, bad = found
            raise SerializationError(_message(f"argument {label} of {task_name}", path, bad, "be sent to a task"))
    for key in kwargs:
        if not isinstance(key, str):
            raise SerializationError(f"keyword argument names of {task_name} must be strings, got {key!r}")


def check_value(what, value, purpose):
    """Raises SerializationError if `value` cannot be encoded; `what` names it ("the result of send_email")."""
    found = _find_bad(value)
    if found:
        path, bad = found
        raise SerializationError(_message(what, path, bad, purpose))


def _message(what, path, bad, purpose):
    if path:
        return f"{what} contains, at {path}, a value {_describe(bad)}, which cannot {purpose}; {_hint(bad)}"
    return f"{what} is {_describe(bad)}, which cannot {purpose}; {_hint(bad)}"

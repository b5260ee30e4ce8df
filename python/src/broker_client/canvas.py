"""Workflows, shaped like Celery's canvas: signatures (``task.s()``, ``task.si()``, ``signature()``), ``chain``
(and ``|``), ``group``, ``chord``, and ``GroupResult``.

The daemon runs workflows itself (proto.md §6.7), so no process has to watch one and a crash never leaves one
half-stepped: a chain is one ``enqueue`` of its first task carrying the specs of the others (``chain``), and the
daemon enqueues each link, the previous result first in its arguments, in the commit of the previous one's ``ack``;
a group is one ``enqueue_batch``; a chord is one ``enqueue_chord``. The client only builds the specs, checking every
one first as ``delay`` does (nothing is sent if one is wrong), and names every task (uuid4 hex) so that it can hand
back the last one's AsyncResult at once, its ``.parent`` leading back to the first.

What the daemon does not run is refused here with NotImplementedError, before anything is sent: a group or a chord
inside a chain, a chain or a group as a chord's member, a group or a chord as a chord's callback, and nested groups.
"""

import time
import uuid

#: Tasks per enqueue_batch request for a group (the daemon accepts up to max_enqueue_batch, 10,000 by default).
_BATCH = 1000
#: Options that only delay the first task of a chain: the others start when the one before them ends.
_FIRST_ONLY = ("countdown", "eta")


class Signature:
    """A task with its arguments and options, to enqueue later or as part of a workflow (Celery's signature).

    `task` is a Task, or a task name (it need not be registered here: give `broker` then, or let the workflow's
    other tasks lend theirs). An `immutable` signature (``task.si()``), as a chain's link or a chord's callback,
    does not receive the previous result, and ignores the arguments ``apply_async`` would add.
    """

    def __init__(self, task, args=(), kwargs=None, options=None, immutable=False, broker=None):
        if isinstance(task, str):
            self.task, self.name = None, task
        else:
            self.task, self.name = task, task.name
            broker = broker or task.broker
        self.broker = broker
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable

    def __repr__(self):
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(shown)})"

    def __eq__(self, other):
        return isinstance(other, Signature) and (self.name, self.args, self.kwargs, self.options, self.immutable) \
            == (other.name, other.args, other.kwargs, other.options, other.immutable)

    __hash__ = None

    def set(self, **options):
        """Adds ``apply_async`` options (queue, countdown, priority...); returns the signature, as Celery's."""
        self.options.update(options)
        return self

    def apply_async(self, args=None, kwargs=None, **options):
        """Enqueues the task. `args` come before the signature's own (a partial, as Celery's), `kwargs` are merged;
        `options` override the signature's."""
        args, kwargs = self._merged(args, kwargs)
        return self._task(None).apply_async(args, kwargs, **dict(self.options, **options))

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __or__(self, other):
        return chain(self, other)

    def _merged(self, args, kwargs):
        """The arguments of a call that adds `args` and `kwargs` (ignored by an immutable signature)."""
        if self.immutable:
            return self.args, self.kwargs
        return tuple(args or ()) + self.args, dict(self.kwargs, **(kwargs or {}))

    def _task(self, broker):
        """The Task to build the spec with: the one given, else the name's, sent with this signature's broker or
        the workflow's (`broker`)."""
        if self.task is not None:
            return self.task
        broker = self.broker or broker
        if broker is None:
            raise ValueError(f"signature {self.name!r} has no Broker to be sent with: use broker.signature(...) "
                             f"or signature(..., app=broker)")
        return broker._task_for(self.name)

    def _spec(self, broker, defaults, receives_result, args=(), kwargs=None):
        """The enqueue spec, `defaults` being the workflow's options (the signature's own win). A chain's link
        or a chord's callback `receives_result` first, which the argument check counts unless it is immutable."""
        args, kwargs = self._merged(args, kwargs)
        spec = self._task(broker)._spec(args, kwargs, receives_result=receives_result and not self.immutable,
                                        **dict(defaults, **self.options))
        if self.immutable:
            spec["immutable"] = True
        return spec


def signature(task, args=None, kwargs=None, options=None, *, app=None, immutable=False, **extra_options):
    """A signature of `task` (a name or a Task), as Celery's ``signature("tasks.add", args=(2, 2), countdown=10)``.
    A task not registered here needs `app` (a Broker) to be sent, unless a workflow's other tasks lend theirs."""
    return Signature(task, args, kwargs, dict(options or {}, **extra_options), immutable=immutable, broker=app)


class chain:  # noqa: N801 - Celery's spelling
    """Tasks that run one after the other, each receiving the previous one's result as its first argument (unless
    immutable): ``chain(add.s(2, 2), mul.s(4), notify.si())`` or ``add.s(2, 2) | mul.s(4) | notify.si()``.

    ``apply_async()`` returns the last task's AsyncResult; its ``.parent`` is the one before, and so on. If a task
    fails (no retries left) or is revoked, the daemon ends every later one the same way, so ``get()`` of the last
    raises the failed task's error. Chains inside a chain are flattened (the daemon's links have no chains of
    their own); a group or a chord inside one is not supported.
    """

    def __init__(self, *tasks):
        self.tasks = []
        for task in _members(tasks):
            if isinstance(task, chain):
                self.tasks.extend(task.tasks)
            elif isinstance(task, Signature):
                self.tasks.append(task)
            elif isinstance(task, (group, chord)):
                raise NotImplementedError(
                    f"a {type(task).__name__} inside a chain is not supported by the daemon; a group followed by a "
                    f"task is a chord: chord(group, callback), or group | callback")
            else:
                raise TypeError(f"chain() takes signatures (task.s(...)) and chains, not {type(task).__name__}")
        if not self.tasks:
            raise ValueError("chain() needs at least one task")

    def __repr__(self):
        return " | ".join(map(repr, self.tasks))

    def __or__(self, other):
        return chain(self, other)

    def apply_async(self, args=None, kwargs=None, **options):
        """Enqueues the chain (one request). `args`/`kwargs` complete the first task; `options` are defaults for
        every task (a signature's own win), except that ``countdown``/``eta`` delay the first only and
        ``task_id`` names the last. Returns the last task's AsyncResult."""
        broker = _broker_of(self.tasks)
        head, result = _chain_spec(self.tasks, broker, options, args, kwargs)
        return _sent(broker.connection().call("enqueue", task=head), head, result, broker)

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)


class group:  # noqa: N801 - Celery's spelling
    """Tasks that run in parallel: ``group(add.s(i, i) for i in range(10))``. Members may be chains.

    ``apply_async()`` enqueues them in one ``enqueue_batch`` (one durable write per 1,000 tasks) and returns a
    GroupResult. ``group | callback`` is a chord, as in Celery.
    """

    def __init__(self, *tasks):
        self.tasks = []
        for task in _members(tasks):
            if isinstance(task, (group, chord)):
                raise NotImplementedError(f"a {type(task).__name__} inside a group is not supported: list its tasks "
                                          f"in one group")
            if not isinstance(task, (Signature, chain)):
                raise TypeError(f"group() takes signatures (task.s(...)) and chains, not {type(task).__name__}")
            self.tasks.append(task)
        if not self.tasks:
            raise ValueError("group() needs at least one task")

    def __repr__(self):
        return f"group({', '.join(map(repr, self.tasks))})"

    def __or__(self, other):
        return chord(self, other)

    def apply_async(self, args=None, kwargs=None, **options):
        """Enqueues every member. `args`/`kwargs` complete each member's first task; `options` are defaults for
        every task (a signature's own win); ``task_id`` names the GroupResult. Every member is checked before any
        is sent."""
        broker = _broker_of([sig for member in self.tasks for sig in _links(member)])
        options = dict(options)
        group_id = str(options.pop("task_id", None) or uuid.uuid4().hex)
        planned = [_chain_spec(_links(member), broker, options, args, kwargs) for member in self.tasks]
        results = []
        for start in range(0, len(planned), _BATCH):
            batch = planned[start:start + _BATCH]
            reply = broker.connection().call("enqueue_batch", tasks=[head for head, _ in batch])
            results += [_sent(sent, head, result, broker) for (head, result), sent in zip(batch, reply["tasks"])]
        return GroupResult(group_id, results)

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)


class chord:  # noqa: N801 - Celery's spelling
    """A group whose results go to a callback once every member succeeded: ``chord(header)(callback)`` enqueues at
    once, ``chord(header, callback)`` makes a workflow to ``apply_async()`` later. The callback receives the list
    of the members' results in header order as its first argument (unless immutable), and may be a chain.

    Both return the callback's AsyncResult (the last link's, if it is a chain), its ``.parent`` the GroupResult
    of the members. A member that fails (no retries left) or is revoked makes the callback fail with ChordError,
    the other members still running. Members are single tasks: the daemon does not run a chain as a member.
    """

    def __init__(self, header, body=None):
        self.header = header if isinstance(header, group) else group(header)
        for member in self.header.tasks:
            if not isinstance(member, Signature):
                raise NotImplementedError("a chord's member cannot be a chain (the daemon does not run that); chain "
                                          "its callback instead, or make the member a task that does both steps")
        if body is not None and not isinstance(body, (Signature, chain)):
            raise NotImplementedError(f"a chord's callback is a task or a chain, not a {type(body).__name__}")
        self.body = body

    def __repr__(self):
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body=None, **options):
        """``chord(header)(callback)``: enqueues the chord now, as Celery's."""
        return chord(self.header, body if body is not None else self.body).apply_async(**options)

    def __or__(self, other):
        return chord(self.header, chain(self._body(), other))

    def apply_async(self, args=None, kwargs=None, **options):
        """Enqueues the members and the callback in one request. `args`/`kwargs` complete each member; `options`
        are defaults for every task (a signature's own win), except that ``countdown``/``eta`` delay the members
        only and ``task_id`` names the callback (its last link, if a chain)."""
        members = self.header.tasks
        body = _links(self._body())
        broker = _broker_of(members + body)
        options = dict(options)
        callback_id = options.pop("task_id", None)
        header = [_named(sig._spec(broker, options, False, args, kwargs)) for sig in members]
        parent = GroupResult(uuid.uuid4().hex, [broker.AsyncResult(spec["id"], task_name=spec["task"])
                                                for spec in header])
        rest = {k: v for k, v in options.items() if k not in _FIRST_ONLY}
        if callback_id is not None:
            rest["task_id"] = callback_id
        callback, result = _chain_spec(body, broker, rest, receives_result=True, parent=parent)
        for spec in header + [callback]:
            _no_unique_key(spec, "a chord's member or callback")
        broker.connection().call("enqueue_chord", header=header, callback=callback)
        return result

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def _body(self):
        if self.body is None:
            raise TypeError("this chord has no callback: chord(header)(callback), or chord(header, callback)")
        return self.body


class GroupResult:
    """The results of a group's (or a chord's header's) tasks, in order, as Celery's GroupResult. Its ``id`` is made
    here (the daemon has no group object): it names the group in your logs, and nothing more."""

    def __init__(self, id, results):
        self.id = id
        self.results = list(results)
        self.parent = None

    def __repr__(self):
        return f"<GroupResult {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def get(self, timeout=None, propagate=True):
        """Waits for every task and returns their results in order. With `propagate`, the first failed task (in
        order) raises its error. `timeout` bounds the whole wait (broker_client.TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [r.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                      propagate=propagate) for r in self.results]

    def ready(self):
        return all(r.ready() for r in self.results)

    def successful(self):
        return all(r.successful() for r in self.results)

    def failed(self):
        return any(r.failed() for r in self.results)

    def completed_count(self):
        """How many tasks succeeded."""
        return sum(1 for r in self.results if r.successful())

    def revoke(self):
        for result in self.results:
            result.revoke()


def _members(tasks):
    """The tasks given to chain() or group(): as arguments, or one list or iterable of them (a generator)."""
    if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain, group, chord)):
        return list(tasks[0])
    return list(tasks)


def _links(member):
    return member.tasks if isinstance(member, chain) else [member]


def _broker_of(signatures):
    """The Broker a workflow is sent with: its first signature's that has one."""
    broker = next((sig.broker for sig in signatures if sig.broker is not None), None)
    if broker is None:
        raise ValueError("no task of this workflow has a Broker to be sent with: use broker.signature(...) or "
                         "signature(..., app=broker)")
    return broker


def _named(spec):
    """Gives `spec` an id of the client's if it has none, so its AsyncResult is known before the reply."""
    spec.setdefault("id", uuid.uuid4().hex)
    return spec


def _no_unique_key(spec, what):
    if "unique_key" in spec:
        raise ValueError(f"{spec['task']}: a unique task cannot be {what} (the daemon does not support it); give "
                         f"it no unique_key here")


def _chain_spec(signatures, broker, options, args=(), kwargs=None, receives_result=False, parent=None):
    """The spec of `signatures` run as a chain (the first one's, carrying the others', every one named here) and
    the last one's AsyncResult, whose ``.parent`` leads back to the first (and the first's to `parent`).
    `args`/`kwargs` complete the first; `options` are defaults for all but ``countdown``/``eta`` (the first
    only) and ``task_id`` (the last's id). `receives_result`: the first is itself a chord's callback."""
    options = dict(options)
    last_id = options.pop("task_id", None)
    rest = {k: v for k, v in options.items() if k not in _FIRST_ONLY}
    specs, result = [], parent
    for i, sig in enumerate(signatures):
        spec = sig._spec(broker, options, receives_result, args, kwargs) if i == 0 else sig._spec(broker, rest, True)
        if last_id is not None and i == len(signatures) - 1:
            spec["id"] = str(last_id)
        specs.append(_named(spec))
        result = broker.AsyncResult(spec["id"], parent=result, task_name=sig.name)
    if len(specs) > 1:
        for spec in specs:
            _no_unique_key(spec, "part of a chain")
        specs[0]["chain"] = specs[1:]
    return specs[0], result


def _sent(reply, head, result, broker):
    """The AsyncResult of an enqueued chain or group member: `result`, unless the daemon answered with another task
    (a lone task whose unique key another task holds: that one's, as ``delay`` gives)."""
    if reply["id"] == head["id"]:
        return result
    return broker.AsyncResult(reply["id"], task_name=head["task"])

"""One connection to the daemon: the socket, the framing, the hello, and matching replies to requests.

A frame is a 4-byte big-endian length and one MessagePack map. A request is ``{id, op, ...fields}``; a reply is
``{id, ok: true, body}`` or ``{id, ok: false, error: {code, message}}``. The daemon answers waiting ops (``lease``
and ``get`` with ``wait_ms``) out of order, so replies are matched by id.

The connection is shared by the threads of one process: requests are written under a lock, and whichever caller
is waiting reads the next frame and files it under its id for its owner (no background thread, so a lone caller
pays no thread switch). A worker can therefore long-poll ``lease`` on one thread while another sends ``extend``.

``send(op, on_reply, **fields)`` writes a request without waiting: ``on_reply`` is called with the reply (or the
error) by whichever thread reads it, which is a ``pump()`` thread where nothing else waits (the worker acks this
way, so a child's next task never waits for the previous ack).

A connection belongs to the process that opened it: after a fork the child opens its own (the pid is checked).
It reconnects on the next call after a failure; requests in flight when it broke raise :class:`ConnectionLost`.

Several addresses (``tcp://:TOKEN@a:7420,b:7420``: stateless daemons over one shared store): opening tries them in
turn, starting with the one after the last that failed, and takes the first that says hello. A connection that
breaks, or that gets ``store_unavailable`` (:class:`StoreUnavailable`: that daemon cannot reach the store), makes
the next call start with the next address; and an idle connection the daemon has closed (it stopped) is noticed
before a request is written to it, so that request goes to the next daemon instead of failing.
"""

import itertools
import os
import select
import socket
import struct
import threading
import time
from urllib.parse import urlparse

from . import serialization
from .errors import BrokerError, ConnectionLost, NotFound, StoreUnavailable

PROTOCOL_VERSION = 1
DEFAULT_URL = "tcp://127.0.0.1:7420"
_LENGTH = struct.Struct(">I")


def parse_url(url):
    """``tcp://[:TOKEN@]host:port`` (or ``host:port``, or ``tls://...``) → (host, port, token, tls). The token is
    the URL's password (or its user part when there is none); without one, ``BROKER_TOKEN`` from the environment,
    else None. For a list of addresses, the first (see :func:`parse_addresses`)."""
    addresses, token, tls = parse_addresses(url)
    host, port = addresses[0]
    return host, port, token, tls


def parse_addresses(url):
    """``tcp://[:TOKEN@]a:7420,b:7420`` (or ``a:7420,b:7420``, or ``tls://...``) → ([(host, port), ...], token,
    tls): several daemons over one shared store, the scheme and the token given once for all of them. A single
    address gives a list of one; spaces and empty items are ignored."""
    if "://" not in url:
        url = "tcp://" + url
    scheme, _, rest = url.partition("://")
    userinfo, at, hosts = rest.rstrip("/").rpartition("@")
    items = [item.strip() for item in hosts.split(",") if item.strip()] or [""]
    addresses = []
    token = None
    for item in items:
        parsed = urlparse(f"{scheme}://{userinfo}{at}{item}")
        if parsed.scheme not in ("tcp", "broker", "tls"):
            raise ValueError(f"broker URL {redact(url)!r}: the scheme must be tcp:// or tls://")
        token = parsed.password or parsed.username or None
        addresses.append((parsed.hostname or "127.0.0.1", parsed.port or 7420))
    token = token or os.environ.get("BROKER_TOKEN") or None
    return addresses, token, scheme == "tls"


def _tls_context():
    """The TLS settings of ``tls://`` URLs: the system's CAs, or only the CA file in ``BROKER_TLS_CA``."""
    import ssl

    return ssl.create_default_context(cafile=os.environ.get("BROKER_TLS_CA") or None)


def redact(url):
    """`url` without the token it may carry, for logs and messages."""
    if "@" not in (url or ""):
        return url
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


class Connection:
    """A thread-safe, lazily opened connection. ``call(op, **fields)`` returns the reply body or raises."""

    def __init__(self, url=DEFAULT_URL, client_name=None, connect_timeout=10.0):
        self.url = url
        self.addresses, self._token, self._tls = parse_addresses(url)
        self._next = 0  # the index in `addresses` the next open tries first
        self._current = 0  # the index of the address of the open socket
        #: The address connected to (with several, the one that answered; before the first open, the first).
        self.host, self.port = self.addresses[0]
        self.client_name = client_name or f"python-{socket.gethostname()}-{os.getpid()}"
        self.connect_timeout = connect_timeout
        self.server_info = None
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._sock = None
        self._pid = None
        self._generation = 0  # bumped on every (re)connect; a reply belongs to the generation it was asked on
        self._replies = {}
        self._reading = False
        self._callbacks = {}  # request id → (op, on_reply) of `send`s still unanswered

    # -- opening and closing ---------------------------------------------------------------------------------

    def _ensure_open(self):
        """Opens the socket and says hello if this process has none. Called with `_state` held."""
        if self._sock is not None and self._pid == os.getpid():
            if len(self.addresses) == 1 or not self._closed_by_daemon():
                return self._generation
            self._broken(self._generation, ConnectionLost("the broker closed the connection"))
        self._sock = None
        count = len(self.addresses)
        failures = []
        for index in [(self._next + i) % count for i in range(count)]:
            host, port = self.addresses[index]
            try:
                sock, reply = self._open(host, port)
            except (ConnectionLost, BrokerError) as e:
                # With several addresses, try the next one when this daemon is not there, is going away or cannot
                # reach the store; a refused token or version the others would refuse too.
                retry = isinstance(e, ConnectionLost) or e.code == "shutting_down"
                if count == 1 or not retry:
                    raise
                self._next = (index + 1) % count
                failures.append(str(e))
                continue
            self._next = self._current = index
            self.host, self.port = host, port
            break
        else:
            tried = ", ".join(f"{host}:{port}" for host, port in self.addresses)
            raise ConnectionLost(f"cannot connect to any of the broker's addresses ({tried}): {'; '.join(failures)}")
        self.server_info = reply.get("body")
        self._sock = sock
        self._pid = os.getpid()
        self._generation += 1
        self._replies = {}
        self._reading = False
        self._callbacks = {}
        return self._generation

    def _open(self, host, port):
        """Connects to one address and says hello; returns the socket and the hello reply."""
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as e:
            raise ConnectionLost(f"cannot connect to the broker at {host}:{port}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls:
            try:
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
            except OSError as e:  # ssl.SSLError included: an untrusted or mismatched certificate
                sock.close()
                raise ConnectionLost(f"TLS with the broker at {host}:{port}: {e}") from e
        sock.settimeout(None)
        hello = {"id": 0, "op": "hello", "version": PROTOCOL_VERSION, "client": self.client_name}
        if self._token:
            hello["token"] = self._token
        try:
            _write_frame(sock, serialization.packb(hello))
            reply = serialization.unpackb(_read_frame(sock))
        except OSError as e:
            sock.close()
            raise ConnectionLost(f"the broker at {host}:{port} closed the connection during hello") from e
        if not reply.get("ok"):
            sock.close()
            error = reply.get("error") or {}
            raise _error(error.get("code", "internal"), error.get("message", "hello refused"), "hello")
        return sock, reply

    def _closed_by_daemon(self):
        """Whether the open socket, idle (nothing asked and unanswered, nobody reading), has become readable: the
        daemon closed it (it stopped), since it sends nothing unasked. Called with `_state` held."""
        if self._reading or self._callbacks or self._replies:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _broken(self, generation, cause, move_on=True):
        """Marks the connection of `generation` dead and wakes every waiter; unless `move_on` is false (a `close`),
        the next open starts with the next address. Called with `_state` held."""
        if generation != self._generation or self._sock is None:
            return
        if move_on:
            self._next = (self._current + 1) % len(self.addresses)
        try:
            # shutdown() first: it wakes a thread blocked reading this socket, which close() alone does not.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        self._sock = None
        self._reading = False
        self._replies = {}
        self._broken_cause = cause
        orphans, self._callbacks = self._callbacks, {}
        self._state.notify_all()
        return orphans

    def open(self):
        """Connects and says hello now, if not yet done (raises ConnectionLost or BrokerError, e.g. `unauthorized`)."""
        with self._state:
            self._ensure_open()

    def close(self):
        """Closes the socket; the next call reconnects. Leases this connection held go back to their queues."""
        orphans = None
        with self._state:
            if self._sock is not None and self._pid == os.getpid():
                orphans = self._broken(self._generation, ConnectionLost("closed"), move_on=False)
            self._sock = None
        _orphaned(orphans, ConnectionLost("closed"))

    # -- requests --------------------------------------------------------------------------------------------

    def _request(self, op, fields, on_reply=None):
        """Writes one request (registering `on_reply` for its reply first, if given); returns its id and the
        connection generation it went out on. Raises ConnectionLost if it cannot connect, or if the write fails
        and there is no `on_reply` (which is told instead)."""
        request_id = next(self._ids)
        fields["id"] = request_id
        fields["op"] = op
        frame = serialization.packb(fields)
        with self._state:
            generation = self._ensure_open()
            sock = self._sock
            if on_reply is not None:
                self._callbacks[request_id] = (op, on_reply)
                self._state.notify_all()  # a pump waiting for work
        try:
            with self._send_lock:
                _write_frame(sock, frame)
        except OSError as e:
            self._break(generation, e)  # tells `on_reply`, if any
            if on_reply is None:
                raise ConnectionLost(f"{op}: lost the connection to the broker: {e}") from e
        return request_id, generation

    def call(self, op, **fields):
        """Sends one request and returns its reply body; raises BrokerError (NotFound for `not_found`,
        StoreUnavailable for `store_unavailable`). With several addresses, `store_unavailable` also drops the
        connection, so that the next call goes to the next daemon."""
        request_id, generation = self._request(op, fields)
        reply = self._await(request_id, generation, op)
        self._leave_if_storeless(reply, generation)
        return _body(reply, op)

    def _leave_if_storeless(self, reply, generation):
        """With several addresses, drops the connection of `generation` if `reply` says its daemon cannot reach
        the store (`store_unavailable`): the next call goes to the next address."""
        if len(self.addresses) > 1 and not reply.get("ok") and (reply.get("error") or {}).get("code") == \
                "store_unavailable":
            self._break(generation, f"the broker at {self.host}:{self.port} cannot reach its store")

    def send(self, op, on_reply, **fields):
        """Sends one request without waiting for its reply: ``on_reply(body, error)`` is called later, with the reply
        body or with the error (a BrokerError, or ConnectionLost if the connection broke first), by the thread that
        reads the reply. Keep it short: that thread is reading for everyone. Raises ConnectionLost (and does not
        call `on_reply`) only if it cannot connect at all."""
        self._request(op, fields, on_reply)

    def pump(self, stop):
        """Reads replies for everyone until `stop` (a threading.Event) is set, while `send`s are outstanding: the
        thread a process that `send`s gives its connection. Returns once stopped (set `stop`, then `close()` or
        let the outstanding replies arrive)."""
        while not stop.is_set():
            with self._state:
                while not stop.is_set() and (self._reading or not self._callbacks):
                    self._state.wait(0.2)
                if stop.is_set():
                    return
                generation = self._generation
            try:
                self._await(None, generation, "pump")
            except ConnectionLost:
                pass

    def drain(self, timeout=0.0):
        """Reads replies to `send`s without a pump thread, for a process with one thread: those that have arrived
        (`timeout` 0), or until none is outstanding or `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                if self._sock is None or self._pid != os.getpid() or self._reading:
                    return
                waiting = bool(self._callbacks)
                sock, generation = self._sock, self._generation
            # With nothing outstanding, still read what is there: the end of a connection the daemon closed,
            # which would otherwise stay readable for ever.
            ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()) if waiting else 0)
            if not ready:
                return
            try:
                self._await(None, generation, "drain")
            except ConnectionLost:
                return

    def wait_replies(self, timeout):
        """Waits up to `timeout` seconds for a pump thread to read the replies of every outstanding `send`;
        returns whether none is left."""
        deadline = time.monotonic() + timeout
        with self._state:
            while self._callbacks and self._sock is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._state.wait(left)
            return True

    def fileno(self):
        """The socket's file descriptor (to wait for replies with select or poll); None while it is not open."""
        with self._state:
            return self._sock.fileno() if self._sock is not None and self._pid == os.getpid() else None

    def _break(self, generation, cause):
        with self._state:
            orphans = self._broken(generation, cause)
        _orphaned(orphans, ConnectionLost(f"lost the connection to the broker: {cause}"))

    def _await(self, request_id, generation, op):
        """Waits for the reply to `request_id`, reading frames for everyone while no other thread does (with
        `request_id` None: reads one frame for the others and returns)."""
        while True:
            with self._state:
                while True:
                    if generation != self._generation or self._sock is None:
                        raise ConnectionLost(f"{op}: lost the connection to the broker")
                    if request_id is not None and request_id in self._replies:
                        return self._replies.pop(request_id)
                    if not self._reading:
                        break
                    self._state.wait()
                self._reading = True
                sock = self._sock
            try:
                reply = serialization.unpackb(_read_frame(sock))
            except (OSError, ValueError) as e:
                self._break(generation, e)
                raise ConnectionLost(f"{op}: lost the connection to the broker: {e}") from e
            callback = None
            with self._state:
                self._reading = False
                reply_id = reply.get("id")
                callback = self._callbacks.pop(reply_id, None)
                if callback is None and reply_id != request_id:
                    self._replies[reply_id] = reply
                self._state.notify_all()
            if callback is not None:
                _deliver(callback, reply)
                self._leave_if_storeless(reply, generation)
            elif reply_id == request_id:
                return reply
            if request_id is None:
                return None


def _body(reply, op):
    """A reply's body, or the BrokerError it carries."""
    if reply.get("ok"):
        return reply.get("body") or {}
    error = reply.get("error") or {}
    raise _error(error.get("code", "internal"), error.get("message", ""), op)


#: The error codes with a class of their own; the others are plain BrokerErrors.
_ERROR_CLASSES = {"not_found": NotFound, "store_unavailable": StoreUnavailable}


def _error(code, message, op):
    """The exception for a daemon's error reply."""
    return _ERROR_CLASSES.get(code, BrokerError)(code, message, op)


def _deliver(callback, reply):
    op, on_reply = callback
    try:
        body = _body(reply, op)
    except BrokerError as e:
        _call(on_reply, None, e)
        return
    _call(on_reply, body, None)


def _orphaned(orphans, error):
    """Tells the `send`s a broken connection left unanswered."""
    for _op, on_reply in (orphans or {}).values():
        _call(on_reply, None, error)


def _call(on_reply, body, error):
    try:
        on_reply(body, error)
    except Exception:  # a callback's bug must not kill the thread reading for everyone
        import logging

        logging.getLogger("broker_client.connection").exception("a reply callback failed")


def _write_frame(sock, payload):
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _read_exact(sock, n):
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock):
    (length,) = _LENGTH.unpack(_read_exact(sock, 4))
    return _read_exact(sock, length)

"""The worker process: leases tasks, hands them to its pool, heartbeats, shuts down cleanly.

Shape (prefork: one parent, ``concurrency`` children, one connection for leases and one for the rest):

* the **lease loop** holds at most ``concurrency + prefetch`` leased tasks: it takes one permit per task it may
  still hold and long-polls ``lease`` for that many. Tasks beyond the running ones wait, first leased first
  started, their leases kept alive by the heartbeat thread, so a child that finishes starts the next task without a
  round trip to the daemon. The trade-off is Celery's ``worker_prefetch_multiplier``: a prefetched task waits
  behind this worker's running ones while another worker may be idle (``--prefetch 0`` for long tasks);
* one **slot thread** per child hands it tasks in batches (up to its share of the held tasks, a second batch
  while it runs the first) over a pipe. The child runs them and settles each itself (``ack`` or ``fail``) on a
  connection of its own, pipelined, and says when it has settled a batch: the parent does no work per task beyond
  leasing it. Two counters the child keeps in shared memory (started, settled) tell the parent what a child that
  died was running;
* the **heartbeat thread** sends ``extend`` for every held task at about a third of its lease, and stops (kills) a
  child whose running task the daemon reports revoked (a held task not yet started is skipped by the child). It
  also enforces hard time limits: it kills a child whose task has run past its ``time_limit`` (the task fails
  with ``TimeLimitExceeded``, not retried, and the child is replaced). Soft time limits are the child's (SIGALRM).

With the threads and solo pools, slot threads run the tasks in this process and ack them pipelined; a **reply
thread** reads the replies; the heartbeat thread raises time limits in the tasks' threads.

At start the worker declares the rate and concurrency limits its tasks carry to the daemon (``set_limit``), and
the app's periodic tasks (``schedule_add``, see ``Broker.sync_schedules``).

The parent never runs task code. A child that dies mid-task fails its task with ``WorkerLostError`` (retried within
its budget), the tasks it held but had not started go back to their queue unrun, and the child is replaced. If the
parent itself dies, its connection closes and the daemon returns every lease it held to its queue: nothing is
lost, the tasks run again elsewhere.

Shutdown: the first SIGTERM or SIGINT stops leasing, releases prefetched tasks unrun (the attempt not counted) and
lets running tasks finish for up to ``grace`` seconds; tasks still running then are stopped and *released* (back to
their queue, the attempt not counted). A second signal skips the wait. The process exits 0 once every lease is
settled.
"""

import collections
import ctypes
import functools
import logging
import math
import multiprocessing
import os
import queue as queue_module
import select
import signal
import socket
import struct
import threading
import time
from multiprocessing.connection import wait as wait_for

from . import outcomes, schedules, serialization
from .connection import Connection, redact
from .errors import BrokerError, ConnectionLost, SoftTimeLimitExceeded, TimeLimitExceeded
from .execution import (
    LIMIT,
    NO_LIMIT,
    SETTLED,
    STARTED,
    STARTED_AT,
    child_main,
    load_broker,
    monotonic_ms,
    run_job,
    time_limits,
    wake_loop,
)

log = logging.getLogger("broker_client.worker")

#: How long one lease long-poll waits; bounds how fast a shutdown is noticed.
LEASE_POLL_MS = 1000
#: The frame header of multiprocessing's Connection (a message under 2 GiB), which the child reads with.
_FRAME = struct.Struct("!i")
#: How long a child may take to import the app before the worker gives up.
CHILD_START_TIMEOUT = 120.0


class _Running:
    """A leased task the heartbeat thread keeps alive."""

    def __init__(self, job):
        self.job = job
        self.lease_ms = job.get("lease_ms") or 30_000
        self.next_extend = time.monotonic() + self.lease_ms / 3000


class _Slot:
    """One child process of the prefork pool and the parent thread that watches it (see
    :mod:`broker_client.execution` for the child's side).

    Tasks go to the child over a pipe of their own, written without ever blocking: what the pipe cannot take now
    waits in `outbuf` and the slot thread writes it as the child reads. So a child busy with a long task never
    holds up the lease thread, the heartbeat or a shutdown. The child answers on a second pipe."""

    def __init__(self, worker, index):
        self.worker = worker
        self.index = index
        self.lock = threading.Lock()  # guards `outstanding`, `pending`, `ready`, `revoked_id`, `timed_out`, `abandoned`
        # Numbering tasks and queueing their bytes for the child happen together under this lock (the lease
        # thread, this slot's thread, the heartbeat), so the child numbers them in the same order.
        self.send_lock = threading.Lock()
        self.process = None
        self.to_child = None  # the write end of the pipe to the child (non-blocking)
        self.pipe = None  # the read end of the pipe from the child
        self.outbuf = bytearray()  # framed messages the pipe to the child has not taken yet
        self.counters = None  # tasks claimed and done by the child, and its limit (execution.STARTED, ...)
        self.claim = None
        self.outstanding = collections.deque()  # (hand-off number, task) handed to the child and not yet done
        self.pending = []  # tasks for the child while it is being replaced
        self.ready = False  # the child is up and may be handed tasks
        self.next_seq = 0
        self.exiting = False
        self.stopped = False  # warm shutdown: nothing more is handed to the child
        self.doorbell_r, self.doorbell_w = os.pipe()  # wakes the slot thread (bytes to write, or exit)
        os.set_blocking(self.doorbell_w, False)
        self.revoked_id = None  # the daemon said the running task was revoked; the child was killed
        self.timed_out = None  # (task id, limit): the running task passed its hard time limit; the child was killed
        self.abandoned = False  # shutdown ran out of time; the child was killed, its task is released
        self.thread = threading.Thread(target=self._loop, name=f"slot-{index}", daemon=True)

    # -- the child -------------------------------------------------------------------------------------------

    def spawn(self):
        context = self.worker.mp_context
        child_in, to_child = context.Pipe(duplex=False)
        from_child, child_out = context.Pipe(duplex=False)
        counters = context.RawArray("q", 4)
        counters[LIMIT] = NO_LIMIT
        claim = context.Lock()
        process = context.Process(
            target=child_main,
            args=(child_in, child_out, self.worker.app_spec, self.worker.url_override, os.getpid(), counters,
                  claim, _log_setup(), self.worker.time_limit_defaults),
            name=f"broker-worker-child-{self.index}",
            daemon=True,
        )
        process.start()
        child_in.close()
        child_out.close()
        os.set_blocking(to_child.fileno(), False)
        with self.send_lock:
            self.process, self.to_child, self.pipe = process, to_child, from_child
            self.counters, self.claim, self.next_seq = counters, claim, 0
            self.outbuf.clear()
        # One poll set per child, kept: building a selector per wait (multiprocessing's wait) costs the parent
        # more CPU than the rest of a hand-off.
        self.poller = select.poll()
        self.poller.register(from_child.fileno(), select.POLLIN)
        self.poller.register(process.sentinel, select.POLLIN)
        self.poller.register(self.doorbell_r, select.POLLIN)
        self.polling_out = False

    def await_ready(self, timeout=CHILD_START_TIMEOUT):
        ready = wait_for([self.pipe, self.process.sentinel], timeout)
        if self.pipe in ready:
            try:
                message = serialization.unpackb(self.pipe.recv_bytes())
            except (EOFError, OSError):
                message = {"fatal": "the child closed its pipe while starting"}
        elif ready:
            message = {"fatal": f"the child exited with code {self.process.exitcode} while starting"}
        else:
            message = {"fatal": f"the child did not start within {timeout}s"}
        if not message.get("ready"):
            raise RuntimeError(f"worker child {self.index} could not load {self.worker.app_spec}:\n{message['fatal']}")

    def kill(self):
        """Stops the child at once (SIGKILL); the slot thread notices."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def stop(self):
        """Closes the pipes (the child releases what it has not started, and exits) and waits for the child."""
        for end in (self.to_child, self.pipe):
            if end is not None:
                end.close()
        if self.process is not None:
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def _send(self, message):
        """Queues one message for the child and writes what the pipe takes now, never blocking. Called with
        `send_lock` held."""
        if self.to_child is None:
            return
        payload = serialization.packb(message)
        self.outbuf += _FRAME.pack(len(payload))
        self.outbuf += payload
        self._flush()

    def _flush(self):
        """Writes queued bytes to the child until the pipe is full. Called with `send_lock` held."""
        while self.outbuf:
            try:
                written = os.write(self.to_child.fileno(), self.outbuf)
            except BlockingIOError:
                break
            except (OSError, ValueError):  # the child is gone: the slot thread settles what it held
                self.outbuf.clear()
                return
            del self.outbuf[:written]
        if self.outbuf:
            self._ring()  # the slot thread writes the rest as the child reads

    def _ring(self):
        try:
            os.write(self.doorbell_w, b"x")
        except BlockingIOError:
            pass  # already rung

    def tell(self, message):
        with self.send_lock:
            self._send(message)

    def start(self):
        """Starts the slot thread, the child being up."""
        self.ready = True
        self.thread.start()

    def finish(self):
        """Ends the slot thread (at the end of a shutdown)."""
        self.exiting = True
        self._ring()

    def room(self):
        """How many more tasks the child should be handed now (none while it is being replaced)."""
        if not self.ready:
            return 0
        return self.worker.batch - len(self.outstanding) - len(self.pending)

    def offer(self, jobs):
        """Hands `jobs` to the child in one batch (from the lease thread), or keeps them until a child being
        replaced is up."""
        with self.send_lock:
            with self.lock:
                self.pending.extend(jobs)
                if not self.ready:
                    return
            self._hand_pending()

    def _hand_pending(self):
        """Numbers the pending tasks and sends them as one batch. Called with `send_lock` held."""
        with self.lock:
            batch, self.pending = self.pending, []
            if not self.stopped:
                for job in batch:
                    self.outstanding.append((self.next_seq, job))
                    self.next_seq += 1
        if self.stopped:
            self._give_back(batch, "prefetched, not started before the shutdown")
        elif batch:
            self._send({"batch": batch})

    def _hold_claims(self):
        """Takes the child's claim lock and keeps it: the child cannot start another task (it is about to be
        killed, and its successor gets a lock of its own). False if the lock could not be had (the child died
        holding it)."""
        return self.claim is not None and self.claim.acquire(timeout=1.0)

    def tell_stop(self):
        """Warm shutdown: the child finishes its running task; the parent takes back the others it was handed
        (the limit stops the child from claiming them) and releases them, with those waiting for a child being
        replaced."""
        with self.send_lock:
            self.stopped = True
            taken = []
            if self.counters is not None and self.claim.acquire(timeout=1.0):
                try:
                    self.counters[LIMIT] = limit = self.counters[STARTED]
                finally:
                    self.claim.release()
                with self.lock:
                    taken = [job for seq, job in self.outstanding if seq >= limit]
                    self.outstanding = collections.deque(e for e in self.outstanding if e[0] < limit)
            with self.lock:
                taken += self.pending
                self.pending = []
        self._give_back(taken, "prefetched, not started before the shutdown")

    def _give_back(self, jobs, why):
        """Releases tasks the child will not run."""
        for job in jobs:
            outcomes.release(self.worker.broker.connection(), job, why, functools.partial(self.worker.reported, job))
            self.worker.permits.release()

    def _running(self):
        """The task the child runs now, or None. Called with `lock` held."""
        if self.counters is None:
            return None
        started, settled = self.counters[STARTED], self.counters[SETTLED]
        if started > settled:
            for seq, job in self.outstanding:
                if seq == settled:
                    return job
        return None

    def settled(self, task_id):
        """Whether the child has settled `task_id` without the parent knowing yet."""
        with self.lock:
            return any(job["id"] == task_id and seq < self.counters[SETTLED] for seq, job in self.outstanding)

    def on_revoked(self, job):
        """The daemon says `job` was revoked: stop the child if it runs it, tell it if it holds it, settle it if
        it waits for a child being replaced. Returns whether this slot had it."""
        with self.send_lock:
            with self.lock:
                waiting = next((j for j in self.pending if j["id"] == job["id"]), None)
                if waiting is not None:
                    self.pending.remove(waiting)
                held = any(j["id"] == job["id"] for _, j in self.outstanding)
            if waiting is not None:
                outcomes.settle_revoked(self.worker.broker.connection(), waiting,
                                        functools.partial(self.worker.reported, waiting))
                self.worker.permits.release()
                return True
            if not held:
                return False
            # Hold the child's claims while deciding: it cannot move on to another task, which the kill would
            # otherwise hit.
            if self.ready and self._hold_claims():
                with self.lock:
                    running = self._running()
                    if running is not None and running["id"] == job["id"]:
                        self.revoked_id = job["id"]
                        self.kill()
                        return True  # the claim lock stays taken: this child starts nothing more
                self.claim.release()
            self._send({"revoke": job["id"]})
            return True

    def check_time_limit(self):
        """From the heartbeat thread: kills the child if its running task has passed its hard time limit (the slot
        thread then fails the task with TimeLimitExceeded and replaces the child)."""
        with self.lock:
            if self.revoked_id is not None or self.timed_out is not None or self.abandoned:
                return  # the child is being stopped already (and its claims are held)
            job = self._running()
            limit = self._overdue(job)
        if not limit:
            return
        with self.send_lock:
            # As for a revoke: hold the child's claims, so the kill cannot hit a task it moves on to meanwhile.
            if not (self.ready and self._hold_claims()):
                return
            with self.lock:
                if self._running() is job and self._overdue(job):
                    self.timed_out = (job["id"], limit)
                    self.kill()
                    log.warning("task %s[%s] ran past its time limit (%ss): killing its worker process", job["task"],
                                job["id"], limit)
                    return  # the claim lock stays taken: this child starts nothing more
            self.claim.release()

    def _overdue(self, job):
        """`job`'s hard time limit if the child has run it for longer, else None. Called with `lock` held."""
        if job is None:
            return None
        task = self.worker.broker.tasks.get(job["task"])
        if task is None:
            return None
        _soft, hard = time_limits(task, self.worker.time_limit_defaults)
        return hard if hard and monotonic_ms() - self.counters[STARTED_AT] >= hard * 1000 else None

    def stop_running(self):
        """Shutdown ran out of time: stop the child if it runs a task (which is released)."""
        with self.send_lock:
            if not (self.ready and self._hold_claims()):
                return
            with self.lock:
                if self._running() is not None:
                    self.abandoned = True
                    self.kill()
                    return  # the claim lock stays taken
            self.claim.release()

    # -- the watching thread ---------------------------------------------------------------------------------

    def _loop(self):
        """Watches the child: its reports of settled batches, its death, and the bytes it has still to take."""
        while not self.exiting:
            try:
                if self.ready:
                    self._watch()
                else:
                    self._revive()
            except Exception:  # keep the slot alive; leases it cannot settle expire and return their tasks
                log.exception("slot %d: unexpected error", self.index)
                time.sleep(0.1)

    def _watch(self):
        with self.send_lock:
            want_out = bool(self.outbuf)
        if want_out != self.polling_out:
            if want_out:
                self.poller.register(self.to_child.fileno(), select.POLLOUT)
            else:
                self.poller.unregister(self.to_child.fileno())
            self.polling_out = want_out
        events = dict(self.poller.poll())
        if self.doorbell_r in events:
            os.read(self.doorbell_r, 4096)
        if self.polling_out and self.to_child.fileno() in events:
            with self.send_lock:
                self._flush()
        if self.pipe.fileno() in events:  # the pipe first: a child that answered and then died still answered
            try:
                message = serialization.unpackb(self.pipe.recv_bytes())
            except (EOFError, OSError):
                self._child_died()
                return
            if "done" in message:
                self._done(message["done"])
        elif self.process.sentinel in events:
            self._child_died()

    def _idle(self, seconds):
        """Waits up to `seconds` for the doorbell."""
        if select.select([self.doorbell_r], [], [], seconds)[0]:
            os.read(self.doorbell_r, 4096)

    def _done(self, settled):
        """The child settled every task it was handed up to number `settled`."""
        finished = []
        with self.lock:
            while self.outstanding and self.outstanding[0][0] < settled:
                finished.append(self.outstanding.popleft()[1])
        for job in finished:
            self.worker.reported(job)
            self.worker.permits.release()

    def _child_died(self):
        """Settles what the dead child held: what it settled stays so, the running task fails with WorkerLostError
        (or is released, at a shutdown, or ends REVOKED), the others go back to their queue unrun. Then replaces
        the child, unless the worker is stopping."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        started, settled = self.counters[STARTED], self.counters[SETTLED]
        with self.send_lock, self.lock:  # nothing more is handed to the dead child
            self.ready = False
            self.outbuf.clear()
            jobs = list(self.outstanding)
            self.outstanding.clear()
            revoked_id, timed_out, abandoned = self.revoked_id, self.timed_out, self.abandoned
            self.revoked_id, self.timed_out, self.abandoned = None, None, False
        worker = self.worker
        conn = worker.broker.connection()
        for seq, job in jobs:
            done = functools.partial(worker.reported, job)
            if seq < settled:
                done()
            elif seq >= started:
                outcomes.release(conn, job, "not started: the worker process it was handed to died", done)
            elif abandoned:
                outcomes.release(conn, job, "stopped by shutdown", done)
            elif job["id"] == revoked_id:
                outcomes.settle_revoked(conn, job, done)
            elif timed_out is not None and job["id"] == timed_out[0]:
                outcomes.settle(conn, job, outcomes.time_limit_exceeded(timed_out[1]), timed_out[1], done)
            else:
                outcomes.settle(conn, job, {
                    "ok": False, "retry": True, "countdown_ms": 0,
                    "error": {"type": "WorkerLostError",
                              "message": f"the worker process running the task died (exit code {code})"},
                }, 0.0, done)
            worker.permits.release()
        self.stop()
        self._revive()

    def _revive(self):
        """Starts a new child (not while the worker stops) and hands it what waited; on failure gives those
        tasks back and tries again a little later."""
        if self.worker.stopping.is_set():
            with self.lock:
                pending, self.pending = self.pending, []
            self._give_back(pending, "not started: the worker is stopping")
            self._idle(1.0)  # until the slot thread is told to exit
            return
        try:
            self.spawn()
            self.await_ready()
        except Exception as e:  # the app failed to import, fork failed, ...
            log.error("slot %d: cannot start a worker process: %s; retrying in 2s", self.index, e)
            self.kill()
            self.stop()
            with self.lock:
                pending, self.pending = self.pending, []
            self._give_back(pending, "not started: no worker process to run it")
            self._idle(2.0)
            return
        with self.send_lock:
            with self.lock:
                self.ready = True
            self._hand_pending()


class _ThreadSlot:
    """A slot of the ``threads`` and ``solo`` pools: its thread runs each task itself, in the worker process. No
    pipe, no child, so a short task costs far less; but a thread cannot be stopped: a task revoked while it runs
    ends ``REVOKED`` only once it returns, and one still running when the grace period is over is left to finish
    as the process exits (the daemon then requeues it, the attempt counted).

    Time limits are raised in the task's thread as asynchronous exceptions (``PyThreadState_SetAsyncExc``) by the
    heartbeat thread: SoftTimeLimitExceeded, then TimeLimitExceeded; a task past its hard limit ends FAILURE with
    TimeLimitExceeded whatever it does with them. They take effect only when the thread runs Python code: a task
    blocked in C code (a long ``time.sleep``, a socket read without a timeout) cannot be stopped until that
    returns."""

    def __init__(self, worker, index):
        self.worker = worker
        self.index = index
        self.lock = threading.Lock()  # guards `current`, `revoked`, `limits`, `soft_hit`, `timed_out`
        self.current = None  # the task this thread runs
        self.revoked = False  # the daemon said the current task was revoked
        self.limits = None  # (started, soft, hard) while the current task's code runs under a time limit
        self.soft_hit = False  # SoftTimeLimitExceeded was raised in the current task
        self.timed_out = None  # the hard limit TimeLimitExceeded was raised at, in the current task
        self.thread = threading.Thread(target=self._loop, name=f"slot-{index}", daemon=True)

    def spawn(self):
        pass

    def await_ready(self, timeout=None):
        pass

    def stop(self):
        pass

    def start(self):
        self.thread.start()

    def finish(self):
        self.worker.inbox.put(None)

    def tell_stop(self):
        pass

    def stop_running(self):
        pass  # see the class documentation: the task is not stopped

    def settled(self, task_id):
        return False

    def on_revoked(self, job):
        with self.lock:
            if self.current is not None and self.current["id"] == job["id"]:
                self.revoked = True
                return True
        return False

    def _loop(self):
        while True:
            job = self.worker.inbox.get()
            if job is None:
                return
            if not self.worker.admit(job):
                continue
            try:
                self._run(job)
            except Exception:  # keep the slot alive whatever happens; the lease will expire and return the task
                log.exception("slot %d: unexpected error handling task %s", self.index, job.get("id"))
                self.worker.reported(job)
            finally:
                self.worker.permits.release()

    def _run(self, job):
        with self.lock:
            self.current, self.revoked, self.soft_hit, self.timed_out = job, False, False, None
        started = time.monotonic()
        outcome = run_job(self.worker.broker, job, self)
        with self.lock:
            self.current = None
            revoked, timed_out = self.revoked, self.timed_out
        if timed_out is not None:
            outcome = outcomes.time_limit_exceeded(timed_out)
        done = functools.partial(self.worker.reported, job)
        conn = self.worker.broker.connection()
        if revoked:
            outcomes.settle_revoked(conn, job, done)
        else:
            outcomes.settle(conn, job, outcome, time.monotonic() - started, done)

    # -- time limits: run_job arms them around the task's code; the heartbeat thread checks them -------------

    def arm(self, task):
        soft, hard = time_limits(task, self.worker.time_limit_defaults)
        if soft or hard:
            with self.lock:
                self.limits = (time.monotonic(), soft, hard)

    def disarm(self):
        with self.lock:
            if self.limits is not None:
                self.limits = None
                # An exception raised as the task ended, not yet delivered, must not hit the slot's own code.
                _raise_in_thread(self.thread.ident, None)

    def check_time_limit(self):
        """Raises the time limit the current task has passed in its thread, once each."""
        with self.lock:
            if self.limits is None:
                return
            started, soft, hard = self.limits
            elapsed = time.monotonic() - started
            if hard and elapsed >= hard and self.timed_out is None:
                self.timed_out, exc, limit = hard, TimeLimitExceeded, hard
            elif soft and elapsed >= soft and not self.soft_hit:
                self.soft_hit, exc, limit = True, SoftTimeLimitExceeded, soft
            else:
                return
            _raise_in_thread(self.thread.ident, exc)
            wake_loop(self.thread.ident)  # an `async def` task may be waiting in its event loop
            job = self.current
        log.warning("task %s[%s] ran past its %s (%ss): raising %s in it", job["task"], job["id"],
                    "time limit" if exc is TimeLimitExceeded else "soft time limit", limit, exc.__name__)


def _raise_in_thread(ident, exc):
    """Raises the exception class `exc` in the thread `ident` when it next runs Python code (None: cancels one
    not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


def _log_setup():
    """The root logger's level and format, for a child to log as the worker does."""
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
    return root.getEffectiveLevel(), fmt or logging.BASIC_FORMAT


#: The pools, as Celery names them: prefork runs tasks in child processes; threads in threads of the worker
#: process; solo in one thread.
POOLS = ("prefork", "threads", "solo")


class Worker:
    """``Worker(app_spec, queues=["default"], concurrency=os.cpu_count()).run()``; see the module docstring."""

    def __init__(self, app_spec, queues=None, concurrency=None, url=None, grace=60.0, start_method="spawn",
                 prefetch=None, pool="prefork", soft_time_limit=None, time_limit=None):
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}: one of {', '.join(POOLS)}")
        self.pool = pool
        self.app_spec = app_spec
        self.broker = load_broker(app_spec)
        self.url_override = url
        if url:
            self.broker.url = url
        self.broker.client_name = f"worker@{socket.gethostname()}:{os.getpid()}"
        self.queues = list(queues or [self.broker.default_queue or "default"])
        self.concurrency = 1 if pool == "solo" else max(1, int(concurrency or os.cpu_count() or 1))
        #: Leased tasks held beyond the running ones. The default, three per slot, holds four tasks per slot in all,
        #: as Celery's default ``worker_prefetch_multiplier`` does; children get them in batches.
        self.prefetch = 3 * self.concurrency if prefetch is None else max(0, int(prefetch))
        self.grace = grace
        #: The (soft, hard) time limits in seconds of tasks that set none (None: no limit).
        self.time_limit_defaults = (soft_time_limit, time_limit)
        self.mp_context = multiprocessing.get_context(start_method)
        self.inbox = queue_module.Queue()
        self.held = self.concurrency + self.prefetch
        #: The most tasks handed to a child at once: its share of what the worker holds.
        self.batch = max(1, math.ceil(self.held / self.concurrency))
        self.permits = threading.Semaphore(self.held)
        self.running = {}  # task id → _Running
        self.revoked_ids = set()  # prefetched tasks the daemon said were revoked before they started
        self.running_lock = threading.Lock()
        self.stopping = threading.Event()
        self.cold = False
        slot = _Slot if pool == "prefork" else _ThreadSlot
        self.slots = [slot(self, i) for i in range(self.concurrency)]

    # -- life cycle ------------------------------------------------------------------------------------------

    def run(self):
        """Runs until SIGTERM/SIGINT; returns the exit code (0 after a clean shutdown)."""
        conn = self.broker.connection()
        conn.open()  # fail fast, with the URL in the message, if the daemon is not there or refuses the token
        self._declare(conn)
        # Leases on a connection of their own: replies on one connection keep request order, so a lease that
        # could be answered at once would otherwise wait behind the acks' disk flushes.
        self.lease_connection = Connection(self.broker.url, client_name=self.broker.client_name)
        for slot in self.slots:
            slot.spawn()
        for slot in self.slots:
            slot.await_ready()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        for slot in self.slots:
            slot.start()
        # Reads the replies to the acks this thread's `send`s leave outstanding (see Connection.pump).
        self.pump_stop = threading.Event()
        pump = threading.Thread(target=conn.pump, args=(self.pump_stop,), name="replies", daemon=True)
        pump.start()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        leaser = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        leaser.start()
        log.info("worker ready: %s, queues %s, pool %s, concurrency %d, prefetch %d, daemon %s; tasks: %s",
                 self.app_spec, ",".join(self.queues), self.pool, self.concurrency, self.prefetch,
                 redact(self.broker.url),
                 ", ".join(sorted(self.broker.tasks)))
        try:
            while not self.stopping.is_set():
                self.stopping.wait(0.5)
            for slot in self.slots:  # at once: a child must not start what it holds once its running task ends
                slot.tell_stop()
            leaser.join()
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for slot in self.slots:
            slot.finish()
        for slot in self.slots:
            slot.thread.join(timeout=10)
            slot.stop()
        conn.wait_replies(10)  # the releases and fails of the shutdown, for their log lines
        self.pump_stop.set()
        self.lease_connection.close()
        self.broker.close()
        pump.join(timeout=5)
        log.info("worker stopped")
        return 0

    def _declare(self, conn):
        """Declares the limits and schedules. Both are idempotent, so with several addresses a daemon that goes away
        or cannot reach its store meanwhile (StoreUnavailable is a ConnectionLost) is left for the next address and
        the declarations made again there, once per address at most."""
        for attempt in range(1, len(conn.addresses) + 1):
            try:
                self._declare_limits()
                self._declare_schedules()
                return
            except ConnectionLost as e:
                if attempt == len(conn.addresses):
                    raise
                log.warning("declaring limits and schedules: %s; trying the next address", e)

    def _declare_limits(self):
        """Sets the rate and concurrency limits the registered tasks declare (``rate_limit``,
        ``concurrency_limit``), for every worker together: the daemon keeps them (across its restarts too) and
        holds leases to them. Tasks that declare none are left alone: an operator may have set one."""
        for name, task in sorted(self.broker.tasks.items()):
            if task.rate_limit is None and task.concurrency_limit is None:
                continue
            try:
                self.broker.set_limit(task=name, rate=task.rate_limit, concurrency=task.concurrency_limit)
            except ConnectionLost:
                raise  # StoreUnavailable included: not the declaration's fault
            except BrokerError as e:
                raise BrokerError(e.code, f"task {name}: rate_limit={task.rate_limit!r}, concurrency_limit="
                                  f"{task.concurrency_limit!r}: {e.message}", e.op) from None
            log.info("task %s: rate limit %s, concurrency limit %s (for every worker together)", name,
                     task.rate_limit or "none", task.concurrency_limit or "none")

    def _declare_schedules(self):
        """Adds the app's periodic tasks to the daemon, or updates them. The same definition again changes nothing
        there, so every worker does it at every start and each tick still runs once. Schedules the app no longer
        declares are left alone (``Broker.remove_schedule`` removes one)."""
        for info in self.broker.sync_schedules():
            log.info("schedule %s", schedules.describe(info))

    def stop(self, cold=False):
        """Asks the worker to shut down (what SIGTERM does; `cold` skips the grace period)."""
        self.cold = self.cold or cold
        self.stopping.set()

    def _on_signal(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            log.warning("%s again: stopping running tasks now and releasing them", name)
            self.stop(cold=True)
        else:
            with self.running_lock:
                busy = len(self.running)
            log.warning("%s: warm shutdown, no new tasks; waiting up to %ss for %d running task(s) "
                        "(send it again to stop them now)", name, self.grace, busy)
            self.stop()

    def _drain(self):
        """Releases prefetched tasks, waits for running tasks (up to the grace period), then stops and releases what
        is left."""
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue_module.Empty:
                break
            if job is None:  # not ours: put it back for the slot thread it was meant for
                self.inbox.put(None)
                break
            self.admit(job)  # the worker is stopping: releases it
        deadline = time.monotonic() + self.grace
        while not self.cold and time.monotonic() < deadline:
            with self.running_lock:
                if not self.running:
                    return
            time.sleep(0.05)
        with self.running_lock:
            left = list(self.running.values())
        if left:
            log.warning("grace period over: stopping %d running task(s) and releasing them to their queue", len(left))
        for slot in self.slots:
            slot.stop_running()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.running_lock:
                if not self.running:
                    return
            time.sleep(0.05)

    # -- leasing ---------------------------------------------------------------------------------------------

    def _lease_loop(self):
        backoff = 0.1
        while not self.stopping.is_set():
            if not self.permits.acquire(timeout=0.5):
                continue
            wanted = 1
            while wanted < self.held and self.permits.acquire(blocking=False):
                wanted += 1
            try:
                reply = self.lease_connection.call("lease", queues=self.queues, max=wanted, wait_ms=LEASE_POLL_MS)
                backoff = 0.1
            except (ConnectionLost, BrokerError) as e:
                for _ in range(wanted):
                    self.permits.release()
                log.error("cannot lease from %s: %s; retrying in %.1fs", redact(self.broker.url), e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            tasks = reply.get("tasks", [])
            for _ in range(wanted - len(tasks)):
                self.permits.release()
            with self.running_lock:
                for job in tasks:
                    self.running[job["id"]] = _Running(job)
            if self.pool == "prefork":
                self._dispatch([job for job in tasks if self.admit(job)])
            else:
                for job in tasks:
                    self.inbox.put(job)

    def _dispatch(self, jobs):
        """Hands leased tasks straight to the children with the most room, in batches (the lease thread is the
        only one that hands out new tasks, so no thread hop per task)."""
        while jobs:
            slot = max(self.slots, key=_Slot.room)
            take = max(1, slot.room())  # the permits keep the total within the children's room
            slot.offer(jobs[:take])
            jobs = jobs[take:]

    def admit(self, job):
        """Whether `job`, just leased or taken from the inbox, may be started (or handed to a child). If not,
        settles it: a stopping worker releases it unrun, and a task revoked while it waited ends REVOKED."""
        settle = None
        if self.stopping.is_set():
            settle = functools.partial(outcomes.release, why="prefetched, not started before the shutdown")
        else:
            with self.running_lock:
                if job["id"] in self.revoked_ids:
                    self.revoked_ids.discard(job["id"])
                    settle = outcomes.settle_revoked
        if settle is None:
            return True
        settle(self.broker.connection(), job, done=functools.partial(self.reported, job))
        self.permits.release()
        return False

    def reported(self, job):
        """`job` is settled (or given up on): the heartbeat forgets it (that lease of it: the task may have been
        leased again since)."""
        with self.running_lock:
            running = self.running.get(job["id"])
            if running is not None and running.job.get("lease_id") == job.get("lease_id"):
                del self.running[job["id"]]
                self.revoked_ids.discard(job["id"])

    # -- heartbeats ------------------------------------------------------------------------------------------

    def _heartbeat_loop(self):
        while True:
            with self.running_lock:
                due = [r for r in self.running.values() if r.next_extend <= time.monotonic()]
                idle = not self.running
            if idle and self.stopping.is_set():
                return
            for running in due:
                self._extend(running)
            for slot in self.slots:
                slot.check_time_limit()
            time.sleep(0.1)

    def _extend(self, running):
        job = running.job
        running.next_extend = time.monotonic() + running.lease_ms / 3000
        try:
            reply = self.broker.connection().call("extend", task_id=job["id"], lease_id=job["lease_id"])
        except BrokerError as e:
            if e.code == "lease_lost":
                running.next_extend = float("inf")
                with self.running_lock:
                    forgotten = self.running.get(job["id"]) is not running
                if forgotten or any(slot.settled(job["id"]) for slot in self.slots):
                    return  # settled a moment ago (by a child that has not said so yet, or a release)
                log.warning("task %s[%s]: lease lost (it ran past its lease without a heartbeat getting through); "
                            "it may run again elsewhere", job["task"], job["id"])
            else:
                log.error("task %s[%s]: heartbeat failed: %s", job["task"], job["id"], e)
            return
        except ConnectionLost as e:
            log.error("task %s[%s]: heartbeat failed: %s", job["task"], job["id"], e)
            return
        if reply.get("revoked"):
            with self.running_lock:
                self.revoked_ids.add(job["id"])
            log.warning("task %s[%s] revoked: stopping it, or not starting it", job["task"], job["id"])
            for slot in self.slots:
                if slot.on_revoked(job):
                    break

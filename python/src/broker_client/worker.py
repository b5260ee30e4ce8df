"""The worker's parent process: leases tasks, hands them to child processes, heartbeats, acks, shuts down cleanly.

Shape (one parent, ``concurrency`` children, one connection):

* the **lease loop** holds at most ``concurrency + prefetch`` leased tasks: it takes one permit per task it may
  still hold and long-polls ``lease`` for that many. Tasks beyond the idle children wait in the parent, first
  leased first started, their leases kept alive by the heartbeat thread, so a child that finishes starts the next
  task without a round trip to the daemon. The trade-off is Celery's ``worker_prefetch_multiplier``: a prefetched
  task waits behind this worker's running ones while another worker may be idle (``--prefetch 0`` for long
  tasks);
* one **slot thread** per child sends it a task over a pipe and waits for the outcome (or the child's death). An
  ``ack`` it sends itself without waiting for the reply (a **reply thread** reads the replies and ends each task's
  bookkeeping), so acks are pipelined and the child starts its next task at once; a ``fail`` or ``release`` goes
  to a **reporter thread**. Leasing has a connection of its own, so its replies never queue behind the acks'
  flushes;
* the **heartbeat thread** sends ``extend`` for every running task at about a third of its lease, and stops
  (kills) a child whose task the daemon reports revoked.

The parent never runs task code; a child that dies mid-task fails its task with ``WorkerLostError`` (retried
within its budget), and the child is replaced. If the parent itself dies, its connection closes and the daemon
returns every lease it held to its queue: nothing is lost, the tasks run again elsewhere.

Shutdown: the first SIGTERM or SIGINT stops leasing, releases prefetched tasks unrun (the attempt not counted) and
lets running tasks finish for up to ``grace`` seconds;
tasks still running then are stopped and *released* (back to their queue, the attempt not counted). A second
signal skips the wait. The process exits 0 once every lease is settled.
"""

import logging
import multiprocessing
import os
import queue as queue_module
import select
import signal
import socket
import threading
import time
from multiprocessing.connection import wait as wait_for

from . import serialization
from .connection import Connection
from .errors import BrokerError, ConnectionLost
from .execution import child_main, load_broker, run_job

log = logging.getLogger("broker_client.worker")

#: How long one lease long-poll waits; bounds how fast a shutdown is noticed.
LEASE_POLL_MS = 1000
#: How long a child may take to import the app before the worker gives up.
CHILD_START_TIMEOUT = 120.0


class _Running:
    """A leased task the heartbeat thread keeps alive."""

    def __init__(self, job):
        self.job = job
        self.lease_ms = job.get("lease_ms") or 30_000
        self.next_extend = time.monotonic() + self.lease_ms / 3000


class _Slot:
    """One child process and the parent thread that feeds it."""

    def __init__(self, worker, index):
        self.worker = worker
        self.index = index
        self.lock = threading.Lock()
        self.process = None
        self.pipe = None
        self.current = None  # the job the child is running
        self.revoked = False  # the daemon said the current task was revoked; the child was killed
        self.abandoned = False  # shutdown ran out of time; the child was killed, the lease is released
        self.thread = threading.Thread(target=self._loop, name=f"slot-{index}", daemon=True)

    # -- the child -------------------------------------------------------------------------------------------

    def spawn(self):
        context = self.worker.mp_context
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=child_main,
            args=(child_end, self.worker.app_spec, self.worker.url_override, os.getpid()),
            name=f"broker-worker-child-{self.index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self.process, self.pipe = process, parent_end
        # One poll set per child, kept: building a selector per task (multiprocessing's wait) cost the parent more
        # CPU than the rest of a task's hand-off.
        self.poller = select.poll()
        self.poller.register(parent_end.fileno(), select.POLLIN)
        self.poller.register(process.sentinel, select.POLLIN)

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
        """Stops the child at once (SIGKILL); the slot thread notices and replaces it."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def stop(self):
        if self.pipe is not None:
            self.pipe.close()
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    # -- the feeding thread ----------------------------------------------------------------------------------

    def _loop(self):
        while True:
            job = self.worker.inbox.get()
            if job is None:
                return
            if self.worker.stopping.is_set():
                # A prefetched task: a stopping worker starts nothing new.
                self.worker.report(self.worker.release, job, "prefetched, not started before the shutdown")
                self.worker.permits.release()
                continue
            if self.worker.revoked_waiting(job):
                self.worker.report(self.worker.settle_revoked, job)
                self.worker.permits.release()
                continue
            try:
                self._run(job)
            except Exception:  # keep the slot alive whatever happens; the lease will expire and return the task
                log.exception("slot %d: unexpected error handling task %s", self.index, job.get("id"))
                self.worker.reported(job)
            finally:
                self.worker.permits.release()

    def _poll(self, timeout=None):
        """The child's pipe and process events, waiting up to `timeout` seconds (None: until there is one)."""
        return dict(self.poller.poll(None if timeout is None else int(timeout * 1000)))

    def _run(self, job):
        if self.process.sentinel in self._poll(0):  # it died while idle: replace it before handing it a task
            self._respawn()
        with self.lock:
            self.current, self.revoked, self.abandoned = job, False, False
        started = time.monotonic()
        outcome = None
        try:
            self.pipe.send_bytes(serialization.packb(job))
            # The pipe first: a child that answered and then died still answered (a dead child's pipe reads EOF).
            if self.pipe.fileno() in self._poll():
                outcome = serialization.unpackb(self.pipe.recv_bytes())
        except (EOFError, OSError):
            outcome = None
        with self.lock:
            self.current = None
            revoked, abandoned = self.revoked, self.abandoned
        if outcome is None:
            self._respawn()
            if abandoned:
                self.worker.report(self.worker.release, job, "stopped by shutdown")
            elif revoked:
                self.worker.report(self.worker.settle_revoked, job)
            else:
                code = self.process.exitcode if self.process else None
                self.worker.report(self.worker.settle, job, {
                    "ok": False, "retry": True, "countdown_ms": 0,
                    "error": {"type": "WorkerLostError",
                              "message": f"the worker process running the task died (exit code {code})"},
                }, time.monotonic() - started)
            return
        self._finish(job, outcome, outcome.get("runtime", time.monotonic() - started))

    def _finish(self, job, outcome, runtime):
        if outcome.get("ok"):
            self.worker.ack(job, outcome, runtime)  # sent from here: no hand-off to a reporter
        else:
            self.worker.report(self.worker.settle, job, outcome, runtime)

    def _respawn(self):
        old = self.process
        if old is not None:
            if old.is_alive():
                old.kill()
            old.join(timeout=5)
        if self.pipe is not None:
            self.pipe.close()
        if self.worker.stopping.is_set() and self.worker.cold:
            return
        self.spawn()
        try:
            self.await_ready()
        except RuntimeError as e:
            log.error("%s", e)


class _ThreadSlot(_Slot):
    """A slot of the ``threads`` and ``solo`` pools: its thread runs the task itself, in the worker process. No
    pipe, no child, so a short task costs far less; but a thread cannot be stopped: a task revoked while it runs
    ends ``REVOKED`` only once it returns, and one still running when the grace period is over is left to finish
    as the process exits (the daemon then requeues it, the attempt counted)."""

    def spawn(self):
        pass

    def await_ready(self, timeout=None):
        pass

    def kill(self):
        pass  # see the class documentation: the task is not stopped

    def stop(self):
        pass

    def _run(self, job):
        with self.lock:
            self.current, self.revoked, self.abandoned = job, False, False
        started = time.monotonic()
        outcome = run_job(self.worker.broker, job)
        with self.lock:
            self.current = None
            revoked = self.revoked
        if revoked:
            self.worker.report(self.worker.settle_revoked, job)
        else:
            self._finish(job, outcome, time.monotonic() - started)


#: The pools, as Celery names them: prefork runs tasks in child processes; threads in threads of the worker
#: process; solo in one thread.
POOLS = ("prefork", "threads", "solo")


class Worker:
    """``Worker(app_spec, queues=["default"], concurrency=os.cpu_count()).run()``; see the module docstring."""

    def __init__(self, app_spec, queues=None, concurrency=None, url=None, grace=60.0, start_method="spawn",
                 prefetch=None, pool="prefork"):
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
        #: Leased tasks held beyond the running ones (default: as many as there are children).
        self.prefetch = self.concurrency if prefetch is None else max(0, int(prefetch))
        self.grace = grace
        self.mp_context = multiprocessing.get_context(start_method)
        self.inbox = queue_module.Queue()
        self.outcomes = queue_module.Queue()
        self.reporters = [threading.Thread(target=self._report_loop, name=f"report-{i}", daemon=True)
                          for i in range(max(2, self.concurrency))]
        self.held = self.concurrency + self.prefetch
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
        conn.call("stats")  # fail fast, with the URL in the message, if the daemon is not there
        # Leases on a connection of their own: replies on one connection keep request order, so a lease that
        # could be answered at once would otherwise wait behind the acks' disk flushes.
        self.lease_connection = Connection(self.broker.url, client_name=self.broker.client_name)
        for slot in self.slots:
            slot.spawn()
        for slot in self.slots:
            slot.await_ready()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        for slot in self.slots:
            slot.thread.start()
        for reporter in self.reporters:
            reporter.start()
        # Reads the replies to the acks this thread's `send`s leave outstanding (see Connection.pump).
        self.pump_stop = threading.Event()
        pump = threading.Thread(target=conn.pump, args=(self.pump_stop,), name="replies", daemon=True)
        pump.start()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        leaser = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        leaser.start()
        log.info("worker ready: %s, queues %s, pool %s, concurrency %d, prefetch %d, daemon %s; tasks: %s",
                 self.app_spec, ",".join(self.queues), self.pool, self.concurrency, self.prefetch, self.broker.url,
                 ", ".join(sorted(self.broker.tasks)))
        try:
            while not self.stopping.is_set():
                self.stopping.wait(0.5)
            leaser.join()
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for _ in self.slots:
            self.inbox.put(None)
        for slot in self.slots:
            slot.thread.join(timeout=10)
            slot.stop()
        for _ in self.reporters:
            self.outcomes.put(None)
        for reporter in self.reporters:
            reporter.join(timeout=10)
        self.pump_stop.set()
        self.lease_connection.close()
        self.broker.close()
        pump.join(timeout=5)
        log.info("worker stopped")
        return 0

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
            self.report(self.release, job, "prefetched, not started before the shutdown")
            self.permits.release()
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
            with slot.lock:
                if slot.current is not None:
                    slot.abandoned = True
                    slot.kill()
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
                log.error("cannot lease from %s: %s; retrying in %.1fs", self.broker.url, e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            tasks = reply.get("tasks", [])
            for _ in range(wanted - len(tasks)):
                self.permits.release()
            for job in tasks:
                if self.stopping.is_set():
                    self.release(job, "leased during shutdown")
                    self.permits.release()
                    continue
                with self.running_lock:
                    self.running[job["id"]] = _Running(job)
                self.inbox.put(job)

    def revoked_waiting(self, job):
        """Whether `job`, about to start, was revoked while it waited (prefetched)."""
        with self.running_lock:
            if job["id"] in self.revoked_ids:
                self.revoked_ids.discard(job["id"])
                return True
        return False

    def report(self, settle, job, *args):
        """Queues the daemon call that settles `job` (ack, fail or release) for a reporter thread, so the child
        can take its next task while the acknowledgement waits for the daemon's flush."""
        self.outcomes.put((settle, job, args))

    def reported(self, job):
        with self.running_lock:
            self.running.pop(job["id"], None)
            self.revoked_ids.discard(job["id"])

    def _report_loop(self):
        while True:
            item = self.outcomes.get()
            if item is None:
                return
            settle, job, args = item
            try:
                settle(job, *args)
            except Exception:
                log.exception("task %s[%s]: could not report its outcome", job.get("task"), job.get("id"))
            finally:
                self.reported(job)

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
            time.sleep(0.1)

    def _extend(self, running):
        job = running.job
        running.next_extend = time.monotonic() + running.lease_ms / 3000
        try:
            reply = self.broker.connection().call("extend", task_id=job["id"], lease_id=job["lease_id"])
        except BrokerError as e:
            if e.code == "lease_lost":
                log.warning("task %s[%s]: lease lost (it ran past its lease without a heartbeat getting through); "
                            "it may run again elsewhere", job["task"], job["id"])
                running.next_extend = float("inf")
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
                with slot.lock:
                    if slot.current is not None and slot.current["id"] == job["id"]:
                        slot.revoked = True
                        slot.kill()

    # -- outcomes --------------------------------------------------------------------------------------------

    def ack(self, job, outcome, runtime):
        """Sends the ack of a child's success without waiting for it: the reply is logged, and the task's
        bookkeeping ended, by the thread that reads it."""
        label = f"{job['task']}[{job['id']}]"

        def on_reply(_body, error):
            try:
                if error is None:
                    log.info("task %s succeeded in %.3fs", label, runtime)
                else:
                    _log_refused(label, error)
            finally:
                self.reported(job)

        try:
            self.broker.connection().send("ack", on_reply, task_id=job["id"], lease_id=job["lease_id"],
                                          result=outcome.get("result"))
        except (BrokerError, ConnectionLost) as e:
            on_reply(None, e)

    def settle(self, job, outcome, runtime):
        """Reports a child's outcome to the daemon: ack on success, fail (retrying or not) on error."""
        if outcome.get("ok"):
            self.ack(job, outcome, runtime)
            return
        label = f"{job['task']}[{job['id']}]"
        conn = self.broker.connection()
        try:
            error = outcome["error"]
            fields = {"task_id": job["id"], "lease_id": job["lease_id"], "error": error,
                      "retry": bool(outcome.get("retry"))}
            if outcome.get("countdown_ms") is not None:
                fields["countdown_ms"] = outcome["countdown_ms"]
            reply = conn.call("fail", **fields)
        except (BrokerError, ConnectionLost) as e:
            _log_refused(label, e)
            return
        attempt = job.get("attempt", 1)
        total = job.get("max_retries", 0) + 1
        summary = f"{error.get('type')}: {error.get('message')}"
        if reply.get("state") == "RETRY":
            delay = max(0.0, (reply.get("retry_at_ms", 0) / 1000) - time.time())
            log.warning("task %s failed (attempt %d of %d), retrying in %.1fs: %s", label, attempt, total, delay,
                        summary)
        else:
            why = "no retries left" if outcome.get("retry") else "not retried"
            trace = error.get("traceback")
            log.error("task %s FAILED (attempt %d of %d, %s): %s%s", label, attempt, total, why, summary,
                      f"\n{trace.rstrip()}" if trace else "")

    def settle_revoked(self, job):
        try:
            self.broker.connection().call("fail", task_id=job["id"], lease_id=job["lease_id"], retry=False,
                                          error={"type": "TaskRevokedError", "message": "revoked while running"})
        except (BrokerError, ConnectionLost):
            pass  # expected: the daemon answers `revoked` and records the task as REVOKED
        log.warning("task %s[%s] stopped: revoked", job["task"], job["id"])

    def release(self, job, why):
        try:
            self.broker.connection().call("release", task_id=job["id"], lease_id=job["lease_id"])
            log.info("task %s[%s] released to its queue (%s)", job["task"], job["id"], why)
        except (BrokerError, ConnectionLost) as e:
            log.warning("task %s[%s]: release failed (%s); its lease will expire and return it", job["task"],
                        job["id"], e)


def _log_refused(label, error):
    """Logs why an ack or fail was not recorded."""
    if isinstance(error, ConnectionLost):
        log.error("task %s: could not report its outcome (%s); the task will run again", label, error)
    elif error.code == "revoked":
        log.warning("task %s was revoked while running; its outcome was discarded", label)
    elif error.code == "lease_lost":
        log.error("task %s finished but its lease was lost; the outcome was discarded and the task will run again",
                  label)
    else:
        log.error("task %s: the daemon refused its outcome: %s", label, error)

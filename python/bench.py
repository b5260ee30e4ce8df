"""Benchmark: the numbers Celery users compare, with a no-op task, against a daemon this script starts itself.

    python python/bench.py [--fsync always|interval] [-n 2000] [--latency-samples 500]

Prints:
  * ``.delay()`` rate from one process (sequential calls, each waiting for the daemon's durable reply);
  * end-to-end tasks/s with a 2-process worker (a backlog of N tasks drained: lease → child → ack);
  * p50/p99 of ``.delay().get()`` round trips with that worker idle and waiting.

The daemon is target/release/broker if it exists, else target/debug/broker ($BROKER_BIN overrides), on
127.0.0.1 with a temporary data directory. This module is also the app the benchmark's worker imports
(``bench:broker``), so it defines the no-op task at the top level.
"""

import argparse
import os
import pathlib
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

from broker_client import Broker

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

broker = Broker()


@broker.task(name="bench.noop")
def noop():
    return None


def daemon_binary():
    if os.environ.get("BROKER_BIN"):
        return pathlib.Path(os.environ["BROKER_BIN"])
    for profile in ("release", "debug"):
        path = REPO_ROOT / "target" / profile / "broker"
        if path.is_file():
            return path
    sys.exit("no broker binary: run `cargo build --release` at the repository root or set BROKER_BIN")


def start_daemon(binary, data_dir, fsync):
    process = subprocess.Popen(
        [str(binary), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--fsync", fsync],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(30):
        process.kill()
        sys.exit("the daemon printed no address within 30s")
    line = process.stdout.readline().decode().strip()
    if not line.startswith("broker listening on "):
        process.kill()
        sys.exit(f"{binary} did not print its address (got {line!r}); rebuild it or set BROKER_BIN")
    return process, "tcp://" + line.rsplit(" ", 1)[1]


def start_worker(url, queue, concurrency, prefetch=None, pool="prefork"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "broker_client", "worker", "bench:broker", "--url", url, "--queues", queue,
         "--concurrency", str(concurrency), "--loglevel", "info"]
        + ([] if prefetch is None else ["--prefetch", str(prefetch)]) + ["--pool", pool],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while "worker ready" not in pathlib.Path(log.name).read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the worker did not start:\n{pathlib.Path(log.name).read_text()}")
        time.sleep(0.05)
    return process, log.name


def wait_succeeded(target, timeout=600):
    deadline = time.monotonic() + timeout
    while broker.stats()["totals"]["succeeded"] < target:
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for the worker")
        time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsync", default="always", choices=["always", "interval"])
    parser.add_argument("-n", type=int, default=2000, help="tasks for the rate measurements")
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=None, help="the worker's --prefetch (default: its own)")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    args = parser.parse_args()

    binary = daemon_binary()
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        daemon, url = start_daemon(binary, pathlib.Path(tmp) / "data", args.fsync)
        broker.url = url
        worker = None
        try:
            print(f"daemon {binary} (fsync={args.fsync}), python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

            # 1. .delay() rate from one process: nobody consumes this queue.
            noop.apply_async(queue="bench-delay")  # connect and warm up
            started = time.perf_counter()
            for _ in range(args.n):
                noop.apply_async(queue="bench-delay")
            elapsed = time.perf_counter() - started
            print(f".delay() rate, one process:          {args.n / elapsed:8.0f} tasks/s  ({args.n} in {elapsed:.2f}s)")

            # 2. End to end: a backlog of n tasks drained by a 2-process worker.
            specs = [{"task": noop.name, "queue": "bench"} for _ in range(args.n)]
            for i in range(0, len(specs), 1000):
                broker.connection().call("enqueue_batch", tasks=specs[i:i + 1000])
            base = broker.stats()["totals"]["succeeded"]
            worker, worker_log = start_worker(url, "bench", args.concurrency, args.prefetch, args.pool)
            # The worker was started after the backlog was written, but its start-up is excluded: time from the
            # first completion to the last, plus one task's share.
            first_deadline = time.monotonic() + 60
            while broker.stats()["totals"]["succeeded"] == base:
                if time.monotonic() > first_deadline:
                    sys.exit("the worker processed nothing")
                time.sleep(0.001)
            t0 = time.perf_counter()
            first = broker.stats()["totals"]["succeeded"] - base
            wait_succeeded(base + args.n)
            elapsed = time.perf_counter() - t0
            rate = (args.n - first) / elapsed
            print(f"end to end, {args.concurrency}-process worker:       {rate:8.0f} tasks/s  "
                  f"({args.n - first} in {elapsed:.2f}s)")

            # 3. Round trip latency of .delay().get() with the worker idle.
            samples = []
            for _ in range(args.latency_samples):
                t = time.perf_counter()
                noop.apply_async(queue="bench").get(timeout=30)
                samples.append((time.perf_counter() - t) * 1000)
            samples.sort()
            p50 = statistics.median(samples)
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            print(f".delay().get() latency:              p50 {p50:.2f} ms, p99 {p99:.2f} ms  "
                  f"({len(samples)} samples)")
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            broker.close()
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()

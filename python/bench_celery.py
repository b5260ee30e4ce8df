"""Celery + Redis beside broker: the same no-op task, pool and concurrency, measured the same way, in one table.

    python python/bench_celery.py [--runs 3] [-n 3000] [--latency-samples 500] [--concurrency 2]

Run it from ``scripts/bench-celery``, which prepares a virtualenv with Celery and this package. For each run it
measures, in a rotating order, Celery 5 (prefork pool) with a Redis started here without persistence (the usual
Celery + Redis setup), and broker's worker (prefork) against a daemon at ``fsync = always`` and at ``interval``
(``python/bench.py``). Each measurement prints three figures:

  * ``.delay()`` rate from one process (sequential calls to a queue nobody consumes);
  * end to end: a backlog of N tasks drained by the worker, from its first completion to its last;
  * ``.delay().get()`` p50/p99 with the worker idle and waiting.

The table shows medians over the runs and broker ÷ Celery ratios taken run by run (> 1 favours broker for rates,
< 1 for latencies). ``measure-celery`` is the Celery half, run in a process of its own.
"""

import argparse
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent

FIGURES = [
    ("delay", r"\.delay\(\) rate.*?([0-9.]+) tasks/s", ".delay() rate, one process (tasks/s)", True),
    ("e2e", r"end to end.*?([0-9.]+) tasks/s", "end to end, worker (tasks/s)", True),
    ("p50", r"p50 ([0-9.]+) ms", ".delay().get() p50 (ms)", False),
    ("p99", r"p99 ([0-9.]+) ms", ".delay().get() p99 (ms)", False),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(delay_rate, e2e_rate, n_e2e, elapsed, samples, concurrency):
    """Prints the three figures in python/bench.py's words, so one parser reads both."""
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f".delay() rate, one process:          {delay_rate:8.0f} tasks/s")
    print(f"end to end, {concurrency}-process worker:       {e2e_rate:8.0f} tasks/s  ({n_e2e} in {elapsed:.2f}s)")
    print(f".delay().get() latency:              p50 {p50:.2f} ms, p99 {p99:.2f} ms  ({len(samples)} samples)")


def measure_celery(args):
    """Celery 5 + Redis (no persistence), prefork pool: the figures python/bench.py measures for broker."""
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-celery-")
    redis = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", tmp, "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    worker = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
        os.environ["CELERY_BENCH_URL"] = url
        sys.path.insert(0, str(HERE))
        from bench_celery_worker import noop

        noop.apply_async(queue="bench-delay")
        started = time.perf_counter()
        for _ in range(args.n):
            noop.apply_async(queue="bench-delay")
        delay_rate = args.n / (time.perf_counter() - started)

        results = [noop.apply_async(queue="bench") for _ in range(args.n)]
        env = dict(os.environ, PYTHONPATH=str(HERE))
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench_celery_worker", "worker", "--pool", args.pool,
             "--concurrency", str(args.concurrency), "-Q", "bench", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "warning"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # As for broker: from the first completion (the worker's start-up excluded) to the last, counting stored
        # results with one MGET per look (as python/bench.py reads the daemon's counter), not one wait per task.
        backend = noop.app.backend
        keys = [backend.get_key_for_task(r.id) for r in results]

        def done():
            return sum(1 for v in backend.client.mget(keys) if v is not None)

        deadline = time.monotonic() + 600
        while (done_first := done()) == 0:
            if worker.poll() is not None or time.monotonic() > deadline:
                sys.exit("the Celery worker processed nothing")
            time.sleep(0.001)
        t0 = time.perf_counter()
        while done() < args.n:
            if time.monotonic() > deadline:
                sys.exit("timed out waiting for the Celery worker")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        e2e_rate = (args.n - done_first) / elapsed

        samples = []
        for _ in range(args.latency_samples):
            t = time.perf_counter()
            noop.apply_async(queue="bench").get(timeout=30)
            samples.append((time.perf_counter() - t) * 1000)
        report(delay_rate, e2e_rate, args.n - done_first, elapsed, samples, args.concurrency)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def run_one(system, args):
    """One measurement in its own process; returns {figure: value}."""
    if system == "celery":
        command = [sys.executable, str(HERE / "bench_celery.py"), "measure-celery"]
    else:
        command = [sys.executable, str(HERE / "bench.py"), "--fsync", system.split("-")[1]]
    command += ["-n", str(args.n), "--latency-samples", str(args.latency_samples),
                "--concurrency", str(args.concurrency), "--pool", args.pool]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"{system} failed:\n{out.stdout}\n{out.stderr}")
    values = {}
    for key, pattern, _label, _higher in FIGURES:
        match = re.search(pattern, out.stdout)
        if not match:
            sys.exit(f"{system}: no {key} figure in:\n{out.stdout}")
        values[key] = float(match.group(1))
    return values


def table(records, runs, args):
    systems = ["celery", "broker-always", "broker-interval"]
    import celery

    lines = [
        f"Celery {celery.__version__} + Redis (no persistence) vs broker, {args.pool} pool, concurrency {args.concurrency}, "
        f"no-op task, -n {args.n}, {runs} run(s), medians; broker/celery = median of per-run ratios",
        f"{'figure':<40} {'celery':>10} {'broker always':>14} {'broker interval':>16} {'always/celery':>14} "
        f"{'interval/celery':>16}",
    ]
    for key, _pattern, label, _higher in FIGURES:
        med = {s: statistics.median(r[s][key] for r in records) for s in systems}
        ratio = {s: statistics.median(r[s][key] / r["celery"][key] for r in records) for s in systems[1:]}
        lines.append(f"{label:<40} {med['celery']:>10.2f} {med['broker-always']:>14.2f} "
                     f"{med['broker-interval']:>16.2f} {ratio['broker-always']:>13.2f}× "
                     f"{ratio['broker-interval']:>15.2f}×")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="compare", choices=["compare", "measure-celery"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=3000, help="tasks for the rate measurements")
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"],
                        help="the pool of both workers (Celery's --pool, broker's worker --pool)")
    args = parser.parse_args()
    if args.mode == "measure-celery":
        measure_celery(args)
        return
    systems = ["celery", "broker-always", "broker-interval"]
    records = []
    for run in range(args.runs):
        record = {}
        for i in range(len(systems)):
            system = systems[(i + run) % len(systems)]  # the order rotates, so none is always first
            print(f"run {run + 1}/{args.runs}: {system}", file=sys.stderr, flush=True)
            record[system] = run_one(system, args)
        records.append(record)
    print(table(records, args.runs, args))


if __name__ == "__main__":
    main()

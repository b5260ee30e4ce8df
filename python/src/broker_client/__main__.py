"""The command line: ``python -m broker_client worker myapp:broker --queues a,b --concurrency 4``, and
``python -m broker_client schedules myapp:broker`` (sync the app's periodic tasks to the daemon and list them)."""

import argparse
import logging
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m broker_client", description="broker's Python worker")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run tasks from the daemon")
    worker.add_argument("app", help="where the Broker is: module:attr (a Broker, or a Flask app with init_app)")
    worker.add_argument("--queues", "-Q", default=None, help="comma-separated queues, first has priority "
                        "(default: the broker's default queue, 'default')")
    worker.add_argument("--concurrency", "-c", type=int, default=None,
                        help="child processes running tasks (default: the number of CPUs)")
    worker.add_argument("--pool", "-P", default="prefork", choices=["prefork", "threads", "solo"],
                        help="where tasks run, as Celery's --pool: prefork (child processes, the default), threads "
                        "(threads of this process: for I/O-bound tasks), solo (one thread)")
    worker.add_argument("--prefetch", type=int, default=None,
                        help="leased tasks held beyond the running ones, started as children free up (default: "
                        "--concurrency; 0 for long tasks, so none waits behind a busy child)")
    worker.add_argument("--url", default=None, help="daemon URL, overriding the app's (e.g. tcp://127.0.0.1:7420, or "
                        "tcp://:TOKEN@host:7420 with a token; else BROKER_TOKEN is used; several daemons over one "
                        "shared store: tcp://:TOKEN@a:7420,b:7420, tried in turn)")
    worker.add_argument("--grace", type=float, default=60.0,
                        help="seconds running tasks get to finish after SIGTERM before they are released")
    worker.add_argument("--soft-time-limit", type=float, default=None,
                        help="seconds after which SoftTimeLimitExceeded is raised in a running task, for tasks that "
                        "set no soft_time_limit (default: none)")
    worker.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which a running task is stopped and fails with TimeLimitExceeded, for "
                        "tasks that set no time_limit (default: none)")
    worker.add_argument("--loglevel", "-l", default=os.environ.get("BROKER_LOGLEVEL", "info"))
    listing = commands.add_parser("schedules", help="add or update the app's periodic tasks in the daemon (as a "
                                  "worker does at start) and list every schedule the daemon keeps")
    listing.add_argument("app", help="where the Broker is: module:attr")
    listing.add_argument("--url", default=None, help="daemon URL, overriding the app's (an admin token: listing "
                         "schedules is an admin op)")
    args = parser.parse_args(argv)

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "schedules":
        return _schedules(args.app, args.url)
    logging.basicConfig(level=args.loglevel.upper(), stream=sys.stderr,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    from .errors import BrokerError, ConnectionLost
    from .worker import Worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    worker = Worker(args.app, queues=queues, concurrency=args.concurrency, url=args.url, grace=args.grace,
                    prefetch=args.prefetch, pool=args.pool, soft_time_limit=args.soft_time_limit,
                    time_limit=args.time_limit)
    try:
        return worker.run()
    except (BrokerError, ConnectionLost) as e:
        logging.getLogger("broker_client.worker").error("cannot start: %s", e)
        return 1


def _schedules(app_spec, url):
    """Syncs the app's schedules and prints every schedule the daemon keeps, marking those the app does not
    declare (they are never removed automatically)."""
    from .errors import BrokerError, ConnectionLost
    from .execution import load_broker
    from .schedules import describe

    broker = load_broker(app_spec)
    if url:
        broker.url = url
    try:
        declared = {info["name"] for info in broker.sync_schedules()}
        kept = broker.schedules()
    except (BrokerError, ConnectionLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for info in kept:
        note = "" if info["name"] in declared else f"  [not declared by {app_spec}: remove_schedule() removes it]"
        print(describe(info) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

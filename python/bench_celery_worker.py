"""The Celery app whose worker bench_celery.py starts: the same no-op task, on the Redis in CELERY_BENCH_URL."""

import os

from celery import Celery

app = Celery("bench_celery_app", broker=os.environ["CELERY_BENCH_URL"], backend=os.environ["CELERY_BENCH_URL"])


@app.task(name="bench.noop")
def noop():
    return None

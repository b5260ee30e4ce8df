"""broker_client: a Celery-shaped Python client, worker and Flask integration for the broker daemon.

    from broker_client import Broker
    broker = Broker("tcp://127.0.0.1:7420")       # or Broker(flask_app) / broker.init_app(flask_app)

    @broker.task
    def add(x, y):
        return x + y

    add.delay(2, 3).get(timeout=10)                # run a worker: python -m broker_client worker myapp:broker
    (add.s(2, 3) | add.s(4)).delay()               # workflows: chain, group, chord
    @broker.periodic_task(every=30)                # periodic tasks, kept by the daemon
"""

from .app import AsyncResult, Broker, Task, TaskRequest
from .canvas import GroupResult, Signature, chain, chord, group, signature
from .connection import Connection
from .errors import (
    BrokerError,
    ChordError,
    ConnectionLost,
    MaxRetriesExceededError,
    NotFound,
    NotRegistered,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
    StoreUnavailable,
    TaskFailed,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
)
from .schedules import crontab

__version__ = "0.1.0"

__all__ = [
    "AsyncResult", "Broker", "BrokerError", "ChordError", "Connection", "ConnectionLost", "GroupResult",
    "MaxRetriesExceededError", "NotFound", "NotRegistered", "Retry", "SerializationError", "Signature",
    "SoftTimeLimitExceeded", "StoreUnavailable", "Task", "TaskFailed", "TaskRequest", "TaskRevokedError",
    "TimeLimitExceeded", "TimeoutError", "chain", "chord", "crontab", "group", "signature",
]

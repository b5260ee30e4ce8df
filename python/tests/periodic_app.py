"""The app of the periodic task tests, declaring schedules in the three ways: ``@broker.periodic_task``,
``broker.add_periodic_task`` and ``broker.conf.beat_schedule``. Its own module, so that the workers of the other
tests declare no schedule; the tests read what ran from the daemon."""

import datetime

from broker_client import Broker, crontab

QUEUE = "periodic"

broker = Broker(default_queue=QUEUE)
broker.conf.timezone = "America/New_York"


@broker.periodic_task(every=1, bind=True)
def tick(self):
    return self.request.id


@broker.periodic_task(cron="*/5 * * * *", timezone="Europe/Paris", catch_up="skip", args=("daily",), queue="reports")
def report(kind):
    return kind


@broker.task
def cleanup(days, dry_run=False):
    return days, dry_run


broker.add_periodic_task(3600, cleanup.s(30), name="cleanup hourly")

broker.conf.beat_schedule = {
    "cleanup-every-90s": {
        "task": "periodic_app.cleanup",
        "schedule": datetime.timedelta(seconds=90),
        "args": (7,),
        "kwargs": {"dry_run": True},
        "options": {"queue": "maintenance", "priority": 5},
    },
    "weekday-mornings": {
        "task": "elsewhere.send_digest",  # registered in another app: sent by name
        "schedule": crontab(minute=30, hour=7, day_of_week="mon-fri"),
        "kwargs": {"to": "team"},
    },
}

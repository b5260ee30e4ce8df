"""Periodic tasks, kept by the daemon: Celery's ``crontab``, and turning the schedules an app declares (Celery's
``beat_schedule`` entries among them) into the fields of the ``schedule_add`` op.

There is no beat process: the daemon enqueues each tick itself, with the id ``sched:<name>:<tick>``, so a tick
runs once however many workers declared the schedule, and none is lost or repeated across daemon restarts
(proto.md, ``schedule_add``). Workers declare their app's schedules at start (``Broker.sync_schedules``).
"""

import datetime

#: The keys a ``beat_schedule`` entry may have: Celery's, and the daemon's ``timezone`` and ``catch_up``.
BEAT_KEYS = ("task", "schedule", "args", "kwargs", "options", "timezone", "catch_up")


class crontab:  # noqa: N801 - Celery's spelling
    """A cron schedule with Celery's field names: ``crontab(minute=0, hour="*/3")``, ``crontab(minute=30, hour=7,
    day_of_week="mon-fri")``. A field is cron syntax (``"*/15"``, ``"1-5"``, ``"mon,wed"``), a number, or a list
    or set of them. ``str()`` is the five-field expression the daemon reads: minute, hour, day of month, month,
    day of week (0 or 7 is Sunday, as in Celery). The daemon checks it when the schedule is added."""

    def __init__(self, minute="*", hour="*", day_of_week="*", day_of_month="*", month_of_year="*"):
        self.minute = _field("minute", minute)
        self.hour = _field("hour", hour)
        self.day_of_week = _field("day_of_week", day_of_week)
        self.day_of_month = _field("day_of_month", day_of_month)
        self.month_of_year = _field("month_of_year", month_of_year)

    def __str__(self):
        return " ".join((self.minute, self.hour, self.day_of_month, self.month_of_year, self.day_of_week))

    def __repr__(self):
        return f"<crontab: {self}>"

    def __eq__(self, other):
        return isinstance(other, crontab) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))


def _field(name, value):
    """One cron field as text. A set is sorted: the same schedule must render the same in every process, or each
    worker start would change it in the daemon (restarting its ticks)."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=lambda v: (isinstance(v, str), v))
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"crontab {name}: an empty list")
        return ",".join(_field(name, v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"crontab {name}: expected cron text, a number or a list of them, got {value!r}")
    text = str(value).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"crontab {name}: {value!r} is not one cron field")
    return text


def timing(schedule, timezone=None, default_timezone=None):
    """The ``schedule_add`` fields of `schedule`: seconds (a number or a timedelta) → ``every_ms``; a crontab or a
    cron string → ``cron``, read in `timezone`, else `default_timezone` (``conf.timezone``), else UTC."""
    if isinstance(schedule, datetime.timedelta):
        schedule = schedule.total_seconds()
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        if timezone is not None:
            raise ValueError("a timezone is for cron schedules; this one runs every "
                             f"{schedule} seconds wherever it is")
        return {"every_ms": int(round(schedule * 1000))}
    if isinstance(schedule, (crontab, str)):
        fields = {"cron": str(schedule)}
        timezone = timezone or default_timezone
        if timezone:
            fields["timezone"] = str(timezone)
        return fields
    raise TypeError(f"a schedule is seconds (a number or a timedelta), a crontab(...) or a cron string, not "
                    f"{type(schedule).__name__}")


def beat_entry(name, entry):
    """Checks one ``beat_schedule`` entry (``{"task": ..., "schedule": ..., "args": ..., "kwargs": ...,
    "options": {...}}``) and returns it as a dict with every key (None where absent)."""
    if not isinstance(entry, dict):
        raise TypeError(f"beat_schedule[{name!r}] is a {type(entry).__name__}, not a dict")
    unknown = sorted(set(entry) - set(BEAT_KEYS))
    if unknown:
        raise ValueError(f"beat_schedule[{name!r}]: unknown keys {unknown} (known: {', '.join(BEAT_KEYS)})")
    missing = [key for key in ("task", "schedule") if key not in entry]
    if missing:
        raise ValueError(f"beat_schedule[{name!r}] needs {' and '.join(repr(k) for k in missing)}")
    return {key: entry.get(key) for key in BEAT_KEYS}


def describe(info):
    """One line about a schedule as the daemon lists it (``ScheduleInfo``), for logs and the command line."""
    if "cron" in info:
        when = f"cron {info['cron']!r} ({info.get('timezone', 'UTC')})"
    else:
        when = f"every {info['every_ms'] / 1000:g}s"
    task = info["task"]
    state = "paused" if info.get("paused") else f"next {_time(info.get('next_ms'))}"
    return (f"{info['name']}: {when}, task {task['task']} on queue {task.get('queue', 'default')}, {state}, "
            f"last {_time(info.get('last_ms'))}")


def _time(ms):
    if ms is None:
        return "never"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="seconds")

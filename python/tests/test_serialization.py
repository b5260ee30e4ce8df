"""Arguments and results that are not plain data fail loudly, naming what and where."""

import datetime

import pytest

from broker_client import SerializationError


class Invoice:
    pass


def test_keyword_argument_is_named_with_its_type(tasks, daemon):
    with pytest.raises(SerializationError) as caught:
        tasks.add.delay(1, y=Invoice())
    message = str(caught.value)
    assert "argument 'y' (keyword) of tasks_app.add" in message
    assert "Invoice" in message
    assert "plain data" in message


def test_positional_argument_is_named_by_position(tasks, daemon):
    with pytest.raises(SerializationError, match=r"argument 1 \(positional\) of tasks_app.add is of type datetime"):
        tasks.add.delay(1, datetime.datetime.now())


def test_nested_value_is_located(tasks, daemon):
    with pytest.raises(SerializationError, match=r"argument 0 \(positional\).* at \[2\]\['when'\], a value of type"):
        tasks.add.delay([1, 2, {"when": {1, 2}}], [])


def test_nothing_is_enqueued_when_an_argument_is_bad(tasks, daemon):
    before = tasks.broker.stats()["totals"]["enqueued"]
    with pytest.raises(SerializationError):
        tasks.add.delay(Invoice(), 1)
    assert tasks.broker.stats()["totals"]["enqueued"] == before


def test_result_that_cannot_be_stored_fails_the_task(tasks, worker):
    result = tasks.bad_result.delay()
    with pytest.raises(SerializationError) as caught:
        result.get(timeout=20)
    assert "the result of tasks_app.bad_result contains, at ['when'], a value of type object" in str(caught.value)
    assert result.info_raw["attempts"] == 1


def test_g_value_without_a_dumper_is_named(tasks, daemon):
    from flask import g

    with tasks.flask_app.test_request_context("/"):
        g.user = Invoice()  # not a User: the dumper fails; fall back to a value with no converter
        tasks.broker.g_dumpers.pop("user")
        try:
            with pytest.raises(SerializationError, match=r"g.user .*carried into tasks_app.add.*g_dumper"):
                tasks.add.delay(1, 2)
        finally:
            tasks.broker.g_dumpers["user"] = tasks.dump_user

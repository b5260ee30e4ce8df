"""Workflows run by the daemon, through real workers: chains, groups, chords, their failure policy, and the
request context reaching every task of one."""

import pathlib

import pytest

from broker_client import (
    ChordError,
    GroupResult,
    SerializationError,
    TaskFailed,
    TaskRevokedError,
    chain,
    chord,
    group,
    signature,
)
from conftest import poll


def test_a_chain_passes_each_result_on_except_to_an_immutable_link(tasks, worker):
    result = (tasks.add.s(2, 3) | tasks.add.si(10, 10) | tasks.mul.s(3)).apply_async()
    assert result.get(timeout=20) == 60
    assert result.info_raw["args"] == [20, 3]  # the previous result first
    middle = result.parent
    assert middle.get(timeout=5) == 20 and middle.info_raw["args"] == [10, 10]  # .si(): not given the 5
    first = middle.parent
    assert first.get(timeout=5) == 5 and first.parent is None
    assert not first.info_raw.get("chain")  # handed on when it succeeded


def test_a_chains_arguments_and_options(tasks, worker):
    assert chain(tasks.add.s(1), tasks.mul.s(2)).delay(4).get(timeout=20) == 10  # (4 + 1) * 2: a partial
    by_name = signature(tasks.mul.name, args=(5,))  # not resolved here: the chain lends it its Broker
    result = (tasks.add.s(1, 1) | by_name | tasks.add.s(1).set(countdown=0.3)).apply_async(task_id="chain-end-1")
    assert result.id == "chain-end-1"
    assert result.get(timeout=20) == 11
    info = result.info_raw
    assert info["eta_ms"] - info["created_at_ms"] >= 300  # a link's countdown counts from its turn


def test_a_link_not_enqueued_yet_reads_pending_and_waits_for_the_links_before_it(tasks, worker, gate):
    result = (tasks.block.si(gate["started"], gate["release"], 7) | tasks.add.s(1) | tasks.mul.s(2)).delay()
    poll(lambda: pathlib.Path(gate["started"]).exists(), what="the first link to start")
    assert result.state == "PENDING" and not result.ready()
    # The daemon knows the links to come: the last one's id alone reads PENDING too, and can be waited on.
    alone = tasks.broker.AsyncResult(result.id)
    assert alone.state == "PENDING"
    pathlib.Path(gate["release"]).touch()
    assert result.get(timeout=20) == 16
    assert alone.get(timeout=20) == 16


def test_a_group_gives_its_results_in_order(tasks, worker):
    result = group(tasks.add.s(i, i) for i in range(10)).apply_async()
    assert isinstance(result, GroupResult) and len(result.id) == 32
    assert result.get(timeout=20) == [2 * i for i in range(10)]
    assert result.ready() and result.successful() and not result.failed()
    assert result.completed_count() == len(result) == 10
    mixed = group(tasks.add.s(1, 1) | tasks.mul.s(3), tasks.add.s(2, 2)).delay()  # a member may be a chain
    assert mixed.get(timeout=20) == [6, 4]


def test_a_chords_callback_sums_its_members_results(tasks, worker):
    result = chord(tasks.add.s(i, i) for i in range(5))(tasks.tsum.s())
    assert result.get(timeout=20) == 20
    assert isinstance(result.parent, GroupResult) and result.parent.get(timeout=5) == [0, 2, 4, 6, 8]
    assert chord([tasks.add.s(1, 1), tasks.add.s(2, 2)], tasks.tsum.s(extra=100)).delay().get(timeout=20) == 106
    then = (group(tasks.add.s(1, 1), tasks.add.s(2, 2)) | tasks.tsum.s() | tasks.mul.s(10)).delay()  # a chord
    assert then.get(timeout=20) == 60
    assert then.parent.get(timeout=5) == 6 and then.parent.parent.get(timeout=5) == [2, 4]


def test_a_failed_link_fails_the_rest_with_its_error(tasks, worker):
    result = (tasks.add.s(1, 1) | tasks.fail.si("value", "link 2 broke") | tasks.add.s(1)).apply_async()
    with pytest.raises(ValueError, match="link 2 broke"):
        result.get(timeout=20)
    assert result.state == "FAILURE" and result.info_raw["attempts"] == 0  # never ran
    assert result.parent.state == "FAILURE" and result.parent.info_raw["attempts"] == 1
    assert result.parent.parent.get(timeout=5) == 2


def test_a_revoked_link_revokes_the_rest(tasks, worker):
    result = (tasks.add.s(1, 1) | tasks.add.s(1)).apply_async(countdown=3600)  # the first task only waits
    assert result.parent.state == "SCHEDULED" and result.state == "PENDING"
    result.parent.revoke()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=20)


def test_a_failed_chord_member_fails_the_callback_with_chord_error(tasks, worker):
    result = chord([tasks.add.s(1, 1), tasks.fail.s("value", "member broke")], tasks.tsum.s()).apply_async()
    with pytest.raises(ChordError, match="member broke") as caught:
        result.get(timeout=20)
    assert isinstance(caught.value, TaskFailed) and result.info_raw["attempts"] == 0
    assert result.parent.results[0].get(timeout=20) == 2  # the other members still ran
    assert result.parent.failed() and result.parent.completed_count() == 1


def test_the_request_context_travels_to_every_task_of_a_workflow(tasks, worker):
    with tasks.flask_app.test_request_context("/reports/5?format=pdf", headers={"X-Trace": "trace-7"}):
        from flask import g

        g.user = tasks.USERS[7]
        link = (tasks.add.s(1, 2) | tasks.whoami.si()).delay()
        callback = chord([tasks.add.s(1, 1)], tasks.whoami.si()).delay()
    for result in (link, callback):
        seen = result.get(timeout=20)
        assert seen["request"] and seen["path"] == "/reports/5" and seen["args"] == {"format": "pdf"}
        assert seen["trace"] == "trace-7" and seen["user"] == "ada"


def test_arguments_are_checked_before_anything_is_sent(tasks, daemon):
    before = tasks.broker.stats()["totals"]["enqueued"]
    with pytest.raises(TypeError, match="previous task's result"):
        (tasks.add.s(1, 2) | tasks.add.s(1, 2)).delay()  # a link gets the result too: three arguments
    with pytest.raises(TypeError, match="tasks_app.add"):
        (tasks.add.s(1) | tasks.add.s(1)).delay()  # the first task gets nothing more
    with pytest.raises(SerializationError, match="argument 0"):
        (tasks.add.s(1, 2) | tasks.add.s(object())).delay()
    with pytest.raises(TypeError, match="previous task's result"):
        chord([tasks.add.s(1, 2)], tasks.add.s(1, 2)).delay()
    with pytest.raises(TypeError, match="tasks_app.add"):
        group(tasks.add.s(1, 2), tasks.add.s(1)).delay()
    assert tasks.broker.stats()["totals"]["enqueued"] == before


def test_what_the_daemon_does_not_run_is_refused_clearly(tasks):
    add, tsum = tasks.add, tasks.tsum
    with pytest.raises(NotImplementedError, match="group inside a chain"):
        add.s(1, 1) | group(add.s(1, 1), add.s(2, 2))
    with pytest.raises(NotImplementedError, match="chord inside a chain"):
        chain(add.s(1, 1), chord([add.s(1, 1)], tsum.s()))
    with pytest.raises(NotImplementedError, match="member cannot be a chain"):
        chord([add.s(1, 1) | add.s(1)], tsum.s())
    with pytest.raises(NotImplementedError, match="group inside a group"):
        group(group(add.s(1, 1)))
    with pytest.raises(ValueError, match="unique task cannot be part of a chain"):
        (tasks.sync_account.s("a", "b", "c") | add.si(1, 1)).delay()
    with pytest.raises(ValueError, match="no task of this workflow has a Broker"):
        chain(signature("x.y"), signature("x.z")).delay()
    with pytest.raises(TypeError, match="no callback"):
        chord([add.s(1, 1)]).delay()

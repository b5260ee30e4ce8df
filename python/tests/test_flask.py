"""The Flask request a task was enqueued from is rebuilt around it in the worker, on every attempt."""

import pytest


@pytest.mark.parametrize("retry", [False, True], ids=["first-attempt", "after-retry"])
def test_task_sees_the_request_it_was_enqueued_from(tasks, worker, retry):
    client = tasks.flask_app.test_client()
    response = client.get(
        f"/reports/5?format=pdf&retry={int(retry)}",
        headers={"X-Trace": "trace-42", "X-User-Id": "7", "Authorization": "Bearer secret"},
        base_url="https://shop.example",
    )
    assert response.status_code == 200
    body = tasks.broker.AsyncResult(response.get_json()["task_id"]).get(timeout=20)
    assert body == {
        "request": True,
        "retries": 1 if retry else 0,
        "path": "/reports/5",
        "method": "GET",
        "args": {"format": "pdf", "retry": str(int(retry))},
        "trace": "trace-42",
        "authorization": None,  # on the default deny list: never stored
        "user": "ada",
        "user_type": "User",
        "url": "https://shop.example/reports/5",
    }


def test_task_enqueued_outside_a_request_runs_in_an_app_context(tasks, worker):
    assert tasks.whoami.delay().get(timeout=20) == {"request": False, "app_context": True}


def test_header_allow_list(tasks, daemon):
    from broker_client.flask_context import ContextSettings

    settings = ContextSettings({"BROKER_CONTEXT_HEADERS": ["X-Trace", "Authorization"],
                                "BROKER_CONTEXT_HEADERS_DENY": []})
    assert settings.header_travels("x-trace")
    assert settings.header_travels("Authorization")
    assert not settings.header_travels("X-Other")
    assert not settings.header_travels("Content-Length")


def test_by_default_only_harmless_headers_travel():
    from broker_client.flask_context import ContextSettings

    settings = ContextSettings({})
    for name in ["User-Agent", "accept-language", "X-Request-Id", "traceparent"]:
        assert settings.header_travels(name), name
    # Secrets in custom headers, found stored by an outside test under the old deny-list default.
    for name in ["X-Api-Key", "X-Auth-Token", "X-CSRF-Token", "X-Amz-Security-Token", "Authorization", "Cookie",
                 "Proxy-Authorization", "X-Trace"]:
        assert not settings.header_travels(name), name
    everything = ContextSettings({"BROKER_CONTEXT_HEADERS": "*"})
    assert everything.header_travels("X-Trace") and not everything.header_travels("Cookie")


def test_context_is_stored_with_the_task(tasks, daemon):
    """What travels is visible in the daemon (and so on its disk): path, query, headers, g."""
    with tasks.flask_app.test_request_context("/reports/9?x=1", headers={"X-Trace": "t", "Cookie": "s=1"}):
        from flask import g

        g.user = tasks.USERS[8]
        result = tasks.add.apply_async((1, 2), countdown=3600)
    context = result.info_raw["context"]["flask"]
    result.revoke()
    assert context["path"] == "/reports/9"
    assert context["query_string"] == "x=1"
    assert ["X-Trace", "t"] in context["headers"]
    assert all(name.lower() != "cookie" for name, _ in context["headers"])
    assert context["g"] == {"user": 8}

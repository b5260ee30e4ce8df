"""W3C trace context: the producer's trace travels with the task and the worker continues it, on every pool."""

import pytest

opentelemetry = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is in the test extras")


@pytest.fixture(scope="module")
def tracer():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    return trace.get_tracer("tests")


def test_the_task_runs_in_the_trace_it_was_enqueued_in(tasks, worker, tracer):
    with tracer.start_as_current_span("web request") as span:
        result = tasks.trace_seen.delay()
        trace_id = format(span.get_span_context().trace_id, "032x")
    seen = result.get(timeout=20)
    assert seen["trace_id"] == trace_id
    assert seen["traceparent"].startswith(f"00-{trace_id}-")
    assert result.info_raw["context"]["trace"]["traceparent"] == seen["traceparent"]


def test_a_request_traceparent_travels_without_a_span(tasks, worker):
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with tasks.flask_app.test_request_context("/", headers={"traceparent": incoming}):
        result = tasks.trace_seen.delay()
    seen = result.get(timeout=20)
    assert seen == {"traceparent": incoming, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}


def test_no_trace_no_context(tasks, worker):
    result = tasks.trace_seen.delay()
    assert result.get(timeout=20) == {"traceparent": None, "trace_id": None}
    assert "trace" not in (result.info_raw.get("context") or {})

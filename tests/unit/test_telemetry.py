"""Tracing without an exporter: spans are not recorded, yet every turn still has one trace id."""

from __future__ import annotations

from opentelemetry import trace

from shared import telemetry


def test_without_an_exporter_spans_are_not_recorded_but_carry_and_propagate_trace_ids() -> None:
    telemetry.setup("test")  # no TIDEWIRE_TRACE_EXPORTER / TIDEWIRE_OTLP_ENDPOINT in the unit tests
    with telemetry.tracer.start_as_current_span("gateway.send") as root:
        carrier = telemetry.inject()
        child = telemetry.tracer.start_span("nested")
    assert not root.is_recording(), "a span nobody exports was recorded"
    assert root.get_span_context().is_valid, "a non-recorded span must still have a trace id (logs use it)"
    assert child.get_span_context().trace_id == root.get_span_context().trace_id
    assert carrier.get("traceparent", "").split("-")[1] == telemetry.trace_id_of(root), carrier
    # the next process continues the same trace from the carrier (what NATS headers carry)
    with telemetry.tracer.start_as_current_span("orchestrator.turn", context=telemetry.extract(carrier)) as s:
        assert trace.get_current_span() is s
    assert telemetry.trace_id_of(s) == telemetry.trace_id_of(root)

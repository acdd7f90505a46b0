"""Telemetry for every tidewire process: one trace per turn, Prometheus metrics, logs joined to traces.

Traces (OpenTelemetry SDK). A turn is one trace from the gateway that received the `send`, through
JetStream, the orchestrator that ran it and the tool workers it called, back to the gateway that
wrote the first delta to the client. The W3C `traceparent` travels in NATS message headers
(`Bus` injects it into every JetStream publish made while a span is current) and in
`TurnRequest.trace_context` (the request is stored in the checkpoint store, so a takeover after a
crash continues the same trace). Exporters come from `TIDEWIRE_*` variables (`TelemetrySettings`):
OTLP over HTTP when `TIDEWIRE_OTLP_ENDPOINT` is set, `console` or `file:<path>` (one JSON span per
line; `{service}` and `{pid}` in the path are replaced) from `TIDEWIRE_TRACE_EXPORTER`; with none
configured, spans are non-recording (the sampler drops them at their root): they still carry trace
ids, so logs have them and contexts propagate, at a third of the CPU of a recorded span that would
go nowhere (31.6 → 10.5 µs for a turn span and a child, measured).

Metrics (OpenTelemetry metrics API). Every process has one `MeterProvider` read by an in-memory
reader; `render_prometheus()` turns the cumulative data into Prometheus text format 0.0.4 for the
`/metrics` endpoints. The renderer is ours (no prometheus_client) so metric names are exactly the
instrument names: counters carry no `_total` suffix and keep the names dashboards and tests use.
Hot paths increment plain ints or record into `histogram()` / `counter()` instruments: lean ones of
ours, a bisect and a few additions per record (the SDK's `Histogram.record` and `Counter.add`, with
their locks, attribute hashing and aggregation objects, were 4-6 % of a gateway's and an
orchestrator's CPU at 200 turns/s, py-spy), rendered by `render_prometheus` like the SDK's; values
that already live in the process (gateway counters, upstream accounting) are read by
observable callbacks only when `/metrics` is scraped.

Logs. `setup()` puts a `TraceContextFilter` on the root logger's handlers, which sets
`record.trace_id` (and `span_id`) from the current span: `shared.logs.JsonFormatter` emits it.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, Histogram, InMemoryMetricReader, Sum
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind

from shared.config import from_env

log = logging.getLogger(__name__)

__all__ = [
    "TelemetrySettings",
    "setup",
    "flush",
    "tracer",
    "meter",
    "inject",
    "extract",
    "context_of",
    "record_span",
    "observe_stage",
    "observe",
    "render_prometheus",
    "TraceContextFilter",
    "JsonLinesSpanExporter",
    "LATENCY_BUCKETS_S",
    "PROMETHEUS_CONTENT_TYPE",
    "SpanKind",
    "trace_id_of",
]

# Seconds; fine at the low end (a token hop is milliseconds), coarse past the SLO (seconds).
LATENCY_BUCKETS_S: Sequence[float] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.35,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

tracer: trace.Tracer = trace.get_tracer("tidewire")  # a proxy until setup() installs the SDK provider


@dataclass(frozen=True)
class TelemetrySettings:
    """Read from `TIDEWIRE_OTLP_ENDPOINT`, `TIDEWIRE_TRACE_EXPORTER`, `TIDEWIRE_TRACE_SAMPLE_RATIO`."""

    # OTLP/HTTP collector base URL (http://collector:4318) or the full traces URL (…/v1/traces).
    otlp_endpoint: str = ""
    # "", "none", "console", "otlp" (needs otlp_endpoint) or "file:<path>" (JSON lines, for tests).
    trace_exporter: str = ""
    # Fraction of new traces sampled at their root; children follow their parent's decision.
    trace_sample_ratio: float = 1.0
    otlp_timeout_s: float = 5.0


# ---- set-up ------------------------------------------------------------------------------------
_lock = threading.Lock()
_provider: TracerProvider | None = None
_service = ""


def setup(service: str, instance: str = "", settings: TelemetrySettings | None = None) -> None:
    """Installs the tracer provider and its exporters, and joins logs to traces. Once per process;
    later calls only re-install the log filter (a logging reset drops it)."""
    global _provider, _service, tracer
    _install_log_filter()
    with _lock:
        if _provider is not None:
            return
        s = settings or from_env(TelemetrySettings)
        _service = service
        attrs: dict[str, Any] = {"service.name": service, "service.namespace": "tidewire"}
        if instance:
            attrs["service.instance.id"] = instance
        exporters = _exporters(service, s)
        provider = TracerProvider(
            resource=Resource.create(attrs),
            sampler=ParentBased(TraceIdRatioBased(max(0.0, min(1.0, s.trace_sample_ratio))))
            if exporters
            else ALWAYS_OFF,
        )
        for exporter, delay_ms in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms))
        trace.set_tracer_provider(provider)
        tracer = provider.get_tracer("tidewire")  # the SDK's own, not the proxy: one call less per span
        otel_metrics.set_meter_provider(_meter_provider())
        _provider = provider


def _exporters(service: str, s: TelemetrySettings) -> list[tuple[SpanExporter, float]]:
    out: list[tuple[SpanExporter, float]] = []
    kind = s.trace_exporter.strip()
    if s.otlp_endpoint or kind == "otlp":
        endpoint = s.otlp_endpoint or "http://127.0.0.1:4318"
        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )
        except ImportError:
            log.error(
                "TIDEWIRE_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp-proto-http is not "
                "installed: traces are not exported"
            )
        else:
            out.append((OTLPSpanExporter(endpoint=endpoint, timeout=s.otlp_timeout_s), 1000.0))
    if kind == "console":
        out.append((ConsoleSpanExporter(service_name=service), 1000.0))
    elif kind.startswith("file:"):
        path = kind[5:].replace("{service}", service).replace("{pid}", str(os.getpid()))
        out.append((JsonLinesSpanExporter(path, service), 100.0))
    elif kind not in ("", "none", "otlp"):
        log.warning("unknown TIDEWIRE_TRACE_EXPORTER %r: traces are not exported", kind)
    return out


def flush(timeout_s: float = 5.0) -> None:
    """Exports what is buffered (at service stop; the SDK also shuts down at interpreter exit)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file: for tests and local debugging.

    Each batch is one `write` on an O_APPEND descriptor, so several processes may share a file.
    """

    def __init__(self, path: str, service: str) -> None:
        self._path = path
        self._service = service
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        lines = [json.dumps(_span_dict(s, self._service), separators=(",", ":"), default=str) for s in spans]
        os.write(self._fd, ("\n".join(lines) + "\n").encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_dict(s: ReadableSpan, service: str) -> dict[str, Any]:
    ctx = s.get_span_context()
    assert ctx is not None
    return {
        "service": service,
        "pid": os.getpid(),
        "name": s.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(s.parent.span_id, "016x") if s.parent is not None else None,
        "kind": s.kind.name,
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "links": [format(link.context.span_id, "016x") for link in s.links],
    }


# ---- trace context ---------------------------------------------------------------------------------
def inject(ctx: Context | None = None) -> dict[str, str]:
    """W3C trace context of `ctx` (default: the current one) as a header dict; {} outside a span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context carried by NATS headers or `TurnRequest.trace_context`; an empty one if none."""
    if not carrier:
        return Context()
    return propagate.extract(carrier)


def context_of(span_context: SpanContext) -> Context:
    """A parent context from a remembered SpanContext (no live span object needed)."""
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def trace_id_of(span: Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def record_span(
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    parent: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> None:
    """A span for an interval already measured (a queue wait, a stage timed with `time.time_ns`)."""
    span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=start_ns)
    span.end(end_time=max(start_ns, end_ns))


# ---- metrics -------------------------------------------------------------------------------------
_reader: InMemoryMetricReader | None = None
_meters: MeterProvider | None = None


def _meter_provider() -> MeterProvider:
    global _reader, _meters
    if _meters is None:
        _reader = InMemoryMetricReader()
        _meters = MeterProvider(metric_readers=[_reader])
    return _meters


def meter(name: str = "tidewire") -> otel_metrics.Meter:
    return _meter_provider().get_meter(name)


_Key = tuple[tuple[str, str], ...]


class LeanHistogram:
    """A cumulative histogram with fixed buckets, `record(value, attributes)` as the SDK's."""

    __slots__ = ("name", "description", "bounds", "series")

    def __init__(self, name: str, description: str, bounds: Sequence[float]) -> None:
        self.name, self.description, self.bounds = name, description, tuple(bounds)
        self.series: dict[_Key, list[Any]] = {}  # attributes -> [bucket counts, sum, count]

    def record(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(attributes.items()) if attributes else ()
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [[0] * (len(self.bounds) + 1), 0.0, 0]
        s[0][bisect.bisect_left(self.bounds, amount)] += 1  # buckets are (previous bound, bound]
        s[1] += amount
        s[2] += 1

    def lines(self) -> list[str]:
        out = []
        for key, (counts, total, n) in sorted(self.series.items()):
            attrs, cumulative = dict(key), 0
            for bound, c in zip(self.bounds, counts, strict=False):
                cumulative += c
                out.append(f"{self.name}_bucket{_labels(attrs, ('le', _fmt(float(bound))))} {cumulative}")
            out.append(f"{self.name}_bucket{_labels(attrs, ('le', '+Inf'))} {n}")
            out.append(f"{self.name}_sum{_labels(attrs)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(attrs)} {n}")
        return out


class LeanCounter:
    """A monotonic counter, `add(n, attributes)` as the SDK's."""

    __slots__ = ("name", "description", "series")

    def __init__(self, name: str, description: str) -> None:
        self.name, self.description = name, description
        self.series: dict[_Key, float] = {}

    def add(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(attributes.items()) if attributes else ()
        self.series[key] = self.series.get(key, 0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(dict(k))} {_fmt(v)}" for k, v in sorted(self.series.items())]


_lean: dict[str, LeanHistogram | LeanCounter] = {}


def histogram(name: str, *, description: str = "", buckets: Sequence[float] = ()) -> LeanHistogram:
    """The process's histogram `name` (one per name: a module imported twice shares it)."""
    h = _lean.get(name)
    if not isinstance(h, LeanHistogram):
        h = _lean[name] = LeanHistogram(name, description, buckets or LATENCY_BUCKETS_S)
    return h


def counter(name: str, *, description: str = "") -> LeanCounter:
    c = _lean.get(name)
    if not isinstance(c, LeanCounter):
        c = _lean[name] = LeanCounter(name, description)
    return c


_stage_hist: LeanHistogram | None = None
_stage_attrs: dict[str, dict[str, str]] = {}


def observe_stage(stage: str, seconds: float) -> None:
    """One observation of `tidewire_turn_stage_seconds{stage=…}`: where a turn's first token time goes."""
    global _stage_hist
    if _stage_hist is None:
        _stage_hist = histogram(
            "tidewire_turn_stage_seconds",
            description="Duration of each stage of a turn, on the way to its first token and after",
        )
    attrs = _stage_attrs.get(stage)
    if attrs is None:
        attrs = _stage_attrs.setdefault(stage, {"stage": stage})
    _stage_hist.record(max(0.0, seconds), attrs)


ObservedValue = float | int | Iterable[tuple[Mapping[str, str], float | int]]
_observed: dict[str, Callable[[], ObservedValue]] = {}
_failing: set[str] = set()


def observe(
    name: str, fn: Callable[[], ObservedValue], *, kind: str = "gauge", description: str = "", unit: str = ""
) -> None:
    """Exposes a value the process already keeps, read only when metrics are collected.

    `kind` is "gauge" or "counter" (monotonic). `fn` returns a number or (attributes, value) pairs.
    Registering the same name again replaces the function (an app built twice in one process).
    """
    first = name not in _observed
    _observed[name] = fn
    if not first:
        return

    def callback(_: CallbackOptions) -> Iterable[Observation]:
        try:
            value = _observed[name]()
        except Exception:  # noqa: BLE001 - one broken source must not break /metrics
            # a warning (with the traceback) when a metric starts failing, not at every scrape
            if name not in _failing:
                _failing.add(name)
                log.warning("metric %s is not served while its source fails", name, exc_info=True)
            return []
        if name in _failing:
            _failing.discard(name)
            log.info("metric %s is served again", name)
        if isinstance(value, int | float):
            return [Observation(value)]
        return [Observation(v, dict(a)) for a, v in value]

    m = meter()
    if kind == "counter":
        m.create_observable_counter(name, callbacks=[callback], unit=unit, description=description)
    else:
        m.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def _fmt(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(attrs: Mapping[str, Any] | None, extra: tuple[str, str] | None = None) -> str:
    items = [(k, _esc(v)) for k, v in sorted((attrs or {}).items())]
    if extra is not None:
        items.append(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}"


def render_prometheus(extra: Iterable[tuple[str, str, float | int]] = ()) -> str:
    """Prometheus text format of every instrument of this process, plus `extra` (name, type, value)
    lines for values outside the OpenTelemetry instruments."""
    _meter_provider()
    assert _reader is not None
    out: list[str] = []
    seen: set[str] = set()
    data = _reader.get_metrics_data()
    metrics = [
        m for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics for m in sm.metrics
    ]
    blocks: list[tuple[str, str, str, list[str]]] = [
        (
            inst.name,
            inst.description,
            "histogram" if isinstance(inst, LeanHistogram) else "counter",
            inst.lines(),
        )
        for inst in list(_lean.values())
    ]
    for m in metrics:
        if m.name in _lean:
            continue
        d = m.data
        if isinstance(d, Sum):
            typ = "counter" if d.is_monotonic else "gauge"
        elif isinstance(d, Gauge):
            typ = "gauge"
        elif isinstance(d, Histogram):
            typ = "histogram"
        else:
            continue
        lines: list[str] = []
        if isinstance(d, Histogram):
            for h in d.data_points:
                cumulative = 0
                for bound, n in zip(h.explicit_bounds, h.bucket_counts, strict=False):
                    cumulative += n
                    lines.append(
                        f"{m.name}_bucket{_labels(h.attributes, ('le', _fmt(float(bound))))} {cumulative}"
                    )
                lines.append(f"{m.name}_bucket{_labels(h.attributes, ('le', '+Inf'))} {h.count}")
                lines.append(f"{m.name}_sum{_labels(h.attributes)} {_fmt(h.sum)}")
                lines.append(f"{m.name}_count{_labels(h.attributes)} {h.count}")
        else:
            for p in d.data_points:
                lines.append(f"{m.name}{_labels(p.attributes)} {_fmt(p.value)}")
        blocks.append((m.name, m.description or "", typ, lines))
    for name, description, typ, lines in sorted(blocks, key=lambda b: b[0]):
        if name in seen:
            continue
        seen.add(name)
        if description:
            out.append(f"# HELP {name} {description}")
        out.append(f"# TYPE {name} {typ}")
        out.extend(lines)
    for name, typ, value in extra:
        if name in seen:
            continue
        seen.add(name)
        out.append(f"# TYPE {name} {typ}")
        out.append(f"{name} {_fmt(value)}")
    return "\n".join(out) + "\n"


PROMETHEUS_CONTENT_TYPE = "text/plain"  # aiohttp sets charset; Prometheus text format 0.0.4


# ---- logs ----------------------------------------------------------------------------------------
class TraceContextFilter(logging.Filter):
    """Sets `record.trace_id` / `record.span_id` from the span current where the record was made."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None):
            return True
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


def _install_log_filter() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())

"""OpenTelemetry tracing: spans per request / chunk per stage with the session id, one trace per StreamEdit call.

The trace context comes from the client's gRPC metadata (W3C `traceparent`; `EditClient` injects the caller's
current span) and travels with every hop: the gateway injects its current span into the call (in `Route.trace`
for the stateful stages, whose calls all carry a Route, and a `trace` keyword for TextEncoder and
BidirectionalEditor), and the replica starts its span as a child of it. Spans:

    gateway     videoedit.StreamEdit (the call; child of the client's traceparent, if any)
                  gateway.open, gateway.frames (one per request: session.id, seq, frames in, chunks, frames out),
                  gateway.end; inside them gateway.checkpoint (a cut) and gateway.recover (restore + replay)
    stages      ingest.encode, generator.generate, egress.decode, ingest/generator/egress .open .export .adopt,
                text.encode, bidirectional.edit: children of the gateway span that made the call, with
                session.id, sana.stage and replica.id

Configuration, per process, from the standard environment (`sana-stream serve` forwards OTEL_* to every
replica): OTEL_TRACES_EXPORTER = none (default: the API's no-op tracer, nothing recorded) | otlp | console, or
several comma-separated; `memory` keeps finished spans in the process (the SDK's InMemorySpanExporter; tests read
them through each deployment's `spans()`). OTLP (opentelemetry-exporter-otlp-proto-grpc) sends to
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, batched off the request path. OTEL_SERVICE_NAME
names the service (default sana-stream); `sana.process` says which deployment a span comes from.

Non-goals: metrics (Ray Serve's Prometheus metrics), sampling policy (the SDK reads OTEL_TRACES_SAMPLER).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_STATE: dict = {"on": None, "memory": None}


def setup(process: str) -> bool:
    """Install this process's tracer provider from the environment, once; returns whether tracing is on."""
    if _STATE["on"] is not None:
        return _STATE["on"]
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names:
        _STATE["on"] = False
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "sana-stream"), "sana.process": process}
    )
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise RuntimeError(
                    "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-grpc (pip install "
                    "'sana-stream[serve]')"
                ) from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            _STATE["memory"] = InMemorySpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(_STATE["memory"]))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use none, otlp, console or memory")
    trace.set_tracer_provider(provider)
    _STATE["on"] = True
    return True


def tracer():
    from opentelemetry import trace

    return trace.get_tracer("sana-stream")


def inject() -> tuple[tuple[str, str], ...]:
    """The current span as a W3C carrier (hashable, picklable); () when nothing is traced."""
    if not _STATE["on"]:
        return ()
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(sorted(carrier.items()))


def extract(carrier) -> object | None:
    """A carrier (pairs or a dict, e.g. gRPC metadata) -> an OpenTelemetry Context, or None."""
    if not _STATE["on"] or not carrier:
        return None
    from opentelemetry import propagate

    pairs = carrier.items() if isinstance(carrier, dict) else carrier
    return propagate.extract({str(k).lower(): v for k, v in pairs})


@contextlib.contextmanager
def span(name: str, parent=None, **attributes) -> Iterator[object | None]:
    """A span around a block (None when tracing is off); `parent`: a carrier, or a Span to be the child of."""
    if not _STATE["on"]:
        yield None
        return
    from opentelemetry import trace

    if parent is None or isinstance(parent, tuple | dict | list):
        ctx = extract(parent)
    else:
        ctx = trace.set_span_in_context(parent)
    attrs = {k.replace("_", "."): v for k, v in attributes.items() if v is not None}
    with tracer().start_as_current_span(name, context=ctx, attributes=attrs) as s:
        yield s


def start_span(name: str, parent=None, **attributes):
    """A span to end by hand (`.end()`), e.g. one that outlives several awaits and yields; None when off."""
    if not _STATE["on"]:
        return None
    attrs = {k.replace("_", "."): v for k, v in attributes.items() if v is not None}
    return tracer().start_span(name, context=extract(parent), attributes=attrs)


def set_attributes(s, **attributes) -> None:
    if s is not None:
        s.set_attributes({k.replace("_", "."): v for k, v in attributes.items() if v is not None})


def set_error(s, message: str) -> None:
    if s is not None:
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, message))


def finished_spans(clear: bool = False) -> list[dict]:
    """Spans the `memory` exporter holds, as dicts (name, trace_id, span_id, parent_id, attributes, process)."""
    mem = _STATE["memory"]
    if mem is None:
        return []
    out = []
    for s in mem.get_finished_spans():
        parent = s.parent.span_id if s.parent is not None else None
        out.append({
            "name": s.name,
            "trace_id": f"{s.context.trace_id:032x}",
            "span_id": f"{s.context.span_id:016x}",
            "parent_id": None if parent is None else f"{parent:016x}",
            "attributes": dict(s.attributes or {}),
            "process": s.resource.attributes.get("sana.process"),
            "start_ns": s.start_time,
            "end_ns": s.end_time,
        })  # fmt: skip
    if clear:
        mem.clear()
    return out

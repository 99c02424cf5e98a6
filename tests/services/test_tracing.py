"""OpenTelemetry: one request carrying one chunk produces one trace across the gateway and every stage replica,
parented on the client's `traceparent`, with the session id on every span (in-memory exporters in each replica,
read back through each deployment's `spans()`)."""

from __future__ import annotations

import secrets
import time

from services.routing import Route
from tests.services.conftest import H, W
from tests.services.test_cluster import DEPLOYMENT, PROMPT, replica_names


def all_spans(handle) -> list[dict]:
    from ray import serve

    spans = list(handle.spans.remote().result(timeout_s=60))
    for stage, name in DEPLOYMENT.items():
        h = serve.get_deployment_handle(name, app_name="sana-stream")
        for uid in replica_names(stage):
            spans += h.options(session_id=f"probe-{uid}").spans.remote(route=Route(to=uid)).result(timeout_s=60)
    text = serve.get_deployment_handle("TextEncoderStage", app_name="sana-stream")
    spans += text.spans.remote().result(timeout_s=60)
    # a replica killed by an earlier test may still be listed: the call then reaches a live one a second time
    return list({s["span_id"]: s for s in spans}.values())


def test_one_chunk_is_one_trace_across_the_deployments(cluster, client):
    from engine.testclips import make_clip

    clip = make_clip(25, H, W, seed=5)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    client.metadata = [("traceparent", f"00-{trace_id}-{parent}-01")]  # as a traced caller would send
    # 25 frames in one request: 4 source latents, so chunk 0 (3 latents) runs through all three stages at seq 0
    res = client.stream(clip[:25], PROMPT, chunk_frames=25)
    assert res.responses[0].timings.chunks == 1
    sid = res.session_id
    for _ in range(50):  # the call's span ends just after the client saw the stream end
        spans = [s for s in all_spans(cluster[1]) if s["trace_id"] == trace_id]
        if any(s["name"] == "videoedit.StreamEdit" for s in spans):
            break
        time.sleep(0.1)
    by_id = {s["span_id"]: s for s in spans}

    def one(name, **attrs):
        found = [s for s in spans if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attrs.items())]
        assert len(found) == 1, (name, attrs, [(s["name"], s["attributes"]) for s in spans])
        return found[0]

    def children(span):
        return sorted((s["name"], s["process"]) for s in spans if s["parent_id"] == span["span_id"])

    root = one("videoedit.StreamEdit")
    assert root["parent_id"] == parent and root["process"] == "gateway" and root["attributes"]["session.id"] == sid
    opened = one("gateway.open")
    assert opened["parent_id"] == root["span_id"]
    # open: prompt encoding, each stage's part, and the first checkpoint cut (an export per stage)
    want = ["egress.open", "gateway.checkpoint", "generator.open", "ingest.open", "text.encode"]
    assert children(opened) == [(n, n.split(".")[0]) for n in want], children(opened)
    frames = one("gateway.frames", seq=0)
    assert frames["parent_id"] == root["span_id"] and frames["attributes"]["chunks"] == 1
    want = ["egress.decode", "gateway.checkpoint", "generator.generate", "ingest.encode"]
    assert children(frames) == [(n, n.split(".")[0]) for n in want], children(frames)
    cut = next(s for s in spans if s["name"] == "gateway.checkpoint" and s["parent_id"] == frames["span_id"])
    assert children(cut) == [(f"{n}.export", n) for n in ("egress", "generator", "ingest")], children(cut)
    end = one("gateway.end", seq=1)
    assert end["parent_id"] == root["span_id"]
    # every stage span carries the session and the replica that served it: the one the registry records
    replicas = dict(client.get_session(sid).replicas)
    for s in spans:
        assert s["attributes"].get("session.id") in (sid, None), s
        if s["process"] in replicas:
            assert s["attributes"]["session.id"] == sid and s["attributes"]["replica.id"] == replicas[s["process"]]
            assert by_id[s["parent_id"]]["process"] == "gateway"

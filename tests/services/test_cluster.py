"""The whole application on a real local Ray instance, real gRPC over loopback, a real redis-server registry.

2 replicas per stateful stage, Generator checkpoints after every chunk. Outputs are compared bit for bit with
the engine called directly (same clip, preset, seed, request cuts; 1 torch thread on both sides).
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from services.routing import Route
from tests.services.conftest import MAX_MESSAGE, H, W, h264_stream, reference

PROMPT = "make the red circle blue"
STAGES = ("ingest", "generator", "egress")
DEPLOYMENT = {"ingest": "Ingest", "generator": "Generator", "egress": "Egress"}


@pytest.fixture(scope="module")
def clip():
    from engine.testclips import make_clip

    return make_clip(57, H, W, seed=5)  # 8 latent frames -> chunks of 5 + 3


@pytest.fixture(scope="module")
def ref(editor, clip):
    return reference(editor, clip, PROMPT)


def replica_names(stage: str) -> dict[str, str]:
    """replica unique id -> actor name, for one stage."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"] if isinstance(a, dict) else a
        parts = name.split("#")
        if name.startswith("SERVE_REPLICA::") and len(parts) == 3 and parts[1] == DEPLOYMENT[stage]:
            out[parts[2]] = name
    return out


def stage_info(stage: str) -> dict[str, dict]:
    from ray import serve

    h = serve.get_deployment_handle(DEPLOYMENT[stage], app_name="sana-stream")
    return {uid: h.options(session_id=f"probe-{uid}").info.remote(route=Route(to=uid)).result(timeout_s=60)
            for uid in replica_names(stage)}  # fmt: skip


def test_stream_equals_engine(client, clip, ref):
    res = client.stream(clip, PROMPT, total_frames=len(clip))
    assert res.frames.shape == ref.shape
    assert np.array_equal(res.frames, ref)
    seqs = [r.seq for r in res.responses]
    assert seqs == sorted(seqs) == list(range(len(seqs)))
    assert sum(r.timings.chunks for r in res.responses) == 2
    assert res.finished.frames_out == len(clip)
    info = client.get_session(res.session_id)
    assert info.status == "finished" and set(info.replicas) == set(STAGES)


def test_two_concurrent_sessions_equal_their_solo_runs(cluster, editor, clip):
    from services.client import EditClient

    jobs = {"a": ("turn it into a watercolor", 3), "b": ("make the background a checkerboard", 11)}
    results = {}

    def go(key):
        prompt, seed = jobs[key]
        with EditClient(cluster[0]) as c:
            results[key] = c.stream(clip, prompt, seed=seed, total_frames=len(clip))

    threads = [threading.Thread(target=go, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for key, (prompt, seed) in jobs.items():
        assert np.array_equal(results[key].frames, reference(editor, clip, prompt, seed=seed)), key
    assert not np.array_equal(results["a"].frames, results["b"].frames)


def test_affinity_one_replica_per_stage(cluster, clip):
    from services.client import EditClient

    sessions = []

    def go(i):
        with EditClient(cluster[0]) as c:
            sessions.append(c.stream(clip[:25], PROMPT, seed=i, chunk_frames=8).session_id)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(sessions) == 4
    with EditClient(cluster[0]) as c:
        recorded = {sid: dict(c.get_session(sid).replicas) for sid in sessions}
    for stage in STAGES:
        info = stage_info(stage)
        assert len(info) == 2, f"{stage}: expected 2 replicas, got {sorted(info)}"
        for sid in sessions:
            holders = [uid for uid, i in info.items() if sid in i["served"]]
            assert holders == [recorded[sid][stage]], f"{stage}: session {sid} served by {holders}"
            assert info[holders[0]]["served"][sid] >= 3  # open, frames requests, end: all on one replica


def test_prompt_change_takes_effect_at_next_chunk(client, editor, clip, ref):
    # Requests of 8 frames: chunk 0 (5 latents = frames 0..32) is complete after request 4; the prompt change
    # rides on request 5, so chunk 0 keeps the old prompt and chunk 1 uses the new one.
    change = {5: "turn the background into a checkerboard"}
    res = client.stream(clip, PROMPT, total_frames=len(clip), chunk_frames=8, prompts=change)
    want = reference(editor, clip, PROMPT, cut=8, prompts=change)
    assert np.array_equal(res.frames, want)
    solo = reference(editor, clip, PROMPT, cut=8)
    assert np.array_equal(solo, ref)
    # The frames only chunk 0 decides (its 17 frames released before chunk 1 exists) are unchanged.
    assert np.array_equal(res.frames[:17], solo[:17]) and not np.array_equal(res.frames[17:], solo[17:])


def test_migration_on_drain_is_invisible(client, clip, ref):
    moved = {}
    sid: list[str] = []

    def between(seq):
        if seq == 1:  # chunk 0 is done: move the generator and egress parts mid-stream
            info = client.get_session(sid[0])
            for stage in ("generator", "egress"):
                old = info.replicas[stage]
                r = client.drain(stage, old, timeout_s=30)
                moved[stage] = (old, r.migrated, r.remaining)

    try:
        res = client.stream(clip, PROMPT, total_frames=len(clip), between=between,
                            on_response=lambda r: sid.append(r.session_id) if not sid else None)  # fmt: skip
        assert moved.keys() == {"generator", "egress"}
        assert np.array_equal(res.frames, ref)
        after = client.get_session(res.session_id).replicas
        for stage, (old, migrated, remaining) in moved.items():
            assert migrated >= 1 and remaining == 0
            assert after[stage] != old
    finally:
        for stage, (old, *_) in moved.items():
            client.drain(stage, old, undo=True)


def stream_killing(client, clip, stage: str, after: int, **stream_kw):
    """Stream the clip (by default in requests of 8 frames) and `ray.kill` the session's `stage` replica once the
    response to request `after` arrived (the client sends ahead of the responses, so it waits for that one)."""
    import ray

    killed, sid, answered = {}, [], threading.Event()

    def on_response(r):
        sid.append(r.session_id)
        if r.WhichOneof("kind") == "frames" and r.frames.seq == after:
            answered.set()

    def between(seq):
        if seq == after + 1:
            assert answered.wait(120)
            uid = client.get_session(sid[0]).replicas[stage]
            ray.kill(ray.get_actor(replica_names(stage)[uid], namespace="serve"), no_restart=True)
            killed["uid"] = uid

    kw = {"total_frames": len(clip), "chunk_frames": 8} if clip is not None else {}
    res = client.stream(clip, PROMPT, between=between, on_response=on_response, **{**kw, **stream_kw})
    assert killed
    seqs = [r.seq for r in res.responses]
    assert seqs == list(range(len(seqs)))  # every request answered once, in order
    firsts = [r.first_frame for r in res.responses]
    assert firsts == sorted(firsts) and res.finished.frames_out == res.finished.frames_in
    assert client.get_session(res.session_id).replicas[stage] != killed["uid"]
    return res


def test_resume_after_generator_replica_is_killed(client, clip, ref):
    res = stream_killing(client, clip, "generator", after=1)
    assert np.array_equal(res.frames, ref) and len(res.responses) == 9  # 8 frames requests + end
    # the cut taken at open; requests 0 and 1 replayed, then request 2 (the one that found the replica dead) ran
    assert [r.timings.replayed_requests for r in res.responses] == [0, 0, 2, 0, 0, 0, 0, 0, 0]
    assert sum(r.timings.recomputed_chunks for r in res.responses) == 0


@pytest.mark.parametrize("stage", ["ingest", "egress"])
def test_resume_after_ingest_or_egress_replica_is_killed(client, clip, ref, stage):
    """Every stateful stage is in the checkpoint cut: killing the Ingest (VAE encoder cache) or the Egress (VAE
    decoder context) replica mid-stream rolls all three stages back to the last cut (taken after request 4, where
    chunk 0 finished), replays the requests since and runs the interrupted one again: nothing else changes."""
    res = stream_killing(client, clip, stage, after=5)
    assert np.array_equal(res.frames, ref) and len(res.responses) == 9
    cuts = [r.seq for r in res.responses if r.timings.checkpoint_bytes]
    assert cuts == [4, 7], cuts  # checkpoint_every=1: a cut after each request that finished a chunk
    replayed = [r.timings.replayed_requests for r in res.responses]
    recomputed = sum(r.timings.recomputed_chunks for r in res.responses)
    if stage == "ingest":  # request 6 finds it dead: request 5 is replayed
        assert replayed == [0] * 6 + [1, 0, 0] and recomputed == 0
    else:  # request 6 does not reach the egress (no chunk finished); request 7 finished chunk 1, then found it dead
        assert replayed == [0] * 7 + [2, 0] and recomputed == 1


def test_h264_in_and_out(client, clip):

    from services.ingest import _H264Decoder
    from services.wire import pb

    data = h264_stream(clip[:25])
    res = client.stream(None, PROMPT, h264=data, h264_chunk_bytes=4000, height=H, width=W)
    assert res.finished.frames_in == 25 and res.finished.frames_out == 25
    assert all(r.format == pb.FRAME_FORMAT_H264_ANNEXB for r in res.responses)
    out = _H264Decoder(H, W).push(res.h264, final=True)
    assert out.shape == (25, H, W, 3)


def test_h264_session_resumes_after_ingest_is_killed(client, clip):
    """H.264 in and out through a crash: the restored Ingest rebuilds its decoder from the resync bytes in the cut
    (the stream has an IDR every 8 frames), the Egress replays without encoding and restarts its encoder."""
    from services.ingest import _H264Decoder
    from services.wire import pb

    data = h264_stream(clip, g="8")  # 57 frames, 20 requests of 3000 bytes
    kw = {"h264": data, "h264_chunk_bytes": 3000, "height": H, "width": W}
    solo = client.stream(None, PROMPT, output_format=pb.FRAME_FORMAT_RGB24, **kw).frames  # exact edited frames
    # chunk 1 (frame 40) finishes by request 14, which releases the first 25 edited frames: a cut, and the
    # egress's first encoder has sent them; the kill comes two requests later
    res = stream_killing(client, None, "ingest", after=15, **kw)
    assert res.h264.count(b"\x00\x00\x01\x67") == 2  # the encoder restarted (new SPS + IDR) after the recovery
    out = _H264Decoder(H, W).push(res.h264, final=True)
    assert out.shape == solo.shape == (57, H, W, 3)
    diff = np.abs(out.astype(np.int16) - solo.astype(np.int16)).mean(axis=(1, 2, 3))
    assert diff.max() < 4.0, diff  # H.264 (CRF 18) loss only: the edit saw the same frames


# --- bad input ---------------------------------------------------------------------------------------------------


def _fail(client, requests) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        for _ in client.call(iter(requests), timeout=120):
            pass
    return e.value


def test_bad_inputs_get_precise_statuses_and_leave_others_alone(cluster, client, clip, ref):
    from services.client import EditClient, end_request, frames_request, open_request
    from services.wire import pb

    good = {}

    def background():
        with EditClient(cluster[0]) as c:
            good["res"] = c.stream(clip, PROMPT, total_frames=len(clip))

    t = threading.Thread(target=background)
    t.start()
    op = open_request(PROMPT, H, W)
    f = clip[:8]
    cases = {
        "first not open": ([frames_request(0, f)], grpc.StatusCode.INVALID_ARGUMENT, "first StreamEdit request"),
        "wrong size": ([op, frames_request(0, clip[:2, :64])], grpc.StatusCode.INVALID_ARGUMENT, "192x128 RGB24"),
        "gap": ([op, frames_request(0, f), frames_request(2, f)], grpc.StatusCode.ABORTED, "seq 2 is a gap"),
        "repeat": ([op, frames_request(0, f), frames_request(0, f)], grpc.StatusCode.ABORTED, "seq 0 is a repeat"),
        "reorder": ([op, frames_request(0, f), frames_request(1, f), frames_request(0, f)],
                    grpc.StatusCode.ABORTED, "out of order"),
        "corrupt h264": ([pb.StreamEditRequest(open=pb.SessionOpen(prompt=PROMPT, height=H, width=W,
                                                                   input_format=pb.FRAME_FORMAT_H264_ANNEXB)),
                          pb.StreamEditRequest(frames=pb.FramesIn(seq=0, data=b"\x00\x00\x00\x01\x65" + bytes(
                              range(256)) * 20)), end_request(1)],
                         grpc.StatusCode.INVALID_ARGUMENT, "corrupt H.264"),
        "not annex-b": ([pb.StreamEditRequest(open=pb.SessionOpen(prompt=PROMPT, height=H, width=W,
                                                                  input_format=pb.FRAME_FORMAT_H264_ANNEXB)),
                         pb.StreamEditRequest(frames=pb.FramesIn(seq=0, data=b"RIFF" * 100))],
                        grpc.StatusCode.INVALID_ARGUMENT, "Annex-B"),
        "unknown session": ([pb.StreamEditRequest(open=pb.SessionOpen(session_id="nope", resume_token="x"))],
                            grpc.StatusCode.NOT_FOUND, "unknown session id or resume token"),
        "prompt too long": ([open_request("word " * 100, H, W)], grpc.StatusCode.INVALID_ARGUMENT, "the limit is"),
        "too big": ([op, frames_request(0, clip[:(MAX_MESSAGE // (H * W * 3)) + 1])],
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    }  # fmt: skip
    for name, (reqs, code, text) in cases.items():
        err = _fail(client, reqs)
        assert err.code() == code, (name, err.code(), err.details())
        assert text in err.details(), (name, err.details())
    # a wrong resume token for a real session is just as unknown
    sid = client.stream(clip[:9], PROMPT, chunk_frames=9).session_id
    err = _fail(client, [pb.StreamEditRequest(open=pb.SessionOpen(session_id=sid, resume_token="wrong"))])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    t.join(300)
    assert np.array_equal(good["res"].frames, ref)


def test_resume_with_token_after_disconnect(client, clip, editor):
    from services.client import end_request, frames_request, open_request
    from services.wire import pb

    first = list(client.call(iter([open_request(PROMPT, H, W, total_frames=len(clip)), frames_request(0, clip[:24])])))
    sid, token = first[0].session_id, first[0].resume_token
    assert client.get_session(sid).status == "detached"
    reqs = [pb.StreamEditRequest(open=pb.SessionOpen(session_id=sid, resume_token=token)),
            frames_request(1, clip[24:48]), frames_request(2, clip[48:]), end_request(3)]  # fmt: skip
    second = list(client.call(iter(reqs)))
    assert second[0].opened.resumed and second[0].opened.next_seq == 1
    frames = [r.frames for r in first[1:] + second[1:] if r.WhichOneof("kind") == "frames"]
    out = np.concatenate([np.frombuffer(f.data, np.uint8).reshape(f.count, H, W, 3) for f in frames])
    assert np.array_equal(out, reference(editor, clip, PROMPT))


def test_idle_sessions_are_reaped_and_freed(cluster, client, clip):
    import time

    handle = cluster[1]
    first = list(client.call(iter([__import__("services.client").client.open_request(PROMPT, H, W)])))
    sid = first[0].session_id
    time.sleep(2.5)  # idle_timeout_s = 2 in the fixture
    assert sid in handle.reap_now.remote().result(timeout_s=60)
    with pytest.raises(grpc.RpcError) as e:
        client.get_session(sid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for stage in STAGES:
        assert all(sid not in i["sessions"] for i in stage_info(stage).values()), stage


def test_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster[0]) as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="videoedit.v1.EditService"))
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"videoedit.v1.EditService", "grpc.health.v1.Health"} <= names


# --- bidirectional_short -----------------------------------------------------------------------------------------


def bidirectional_reference(frames, prompt, seed, steps):
    """`sana-stream edit --mode bidirectional_short` on the engine: its defaults (CFG 6, the release's negative
    prompt, motion score 10), the tiny preset's bidirectional DiT, 1 torch thread like the replicas."""
    import torch

    from engine.cli import MODE_DEFAULTS
    from engine.pipeline import Engine, edit_bidirectional
    from engine.sampler import DEFAULT_NEGATIVE_PROMPT, bidirectional_prompt
    from engine.session import SessionSettings

    engine = Engine.load("tiny", mode="bidirectional_short", seed=0)
    s = SessionSettings(prompt=bidirectional_prompt(prompt, 10), negative_prompt=DEFAULT_NEGATIVE_PROMPT, seed=seed,
                        steps=steps, cfg_scale=MODE_DEFAULTS["bidirectional_short"]["cfg_scale"],
                        flow_shift=engine.preset.flow_shift, height=H, width=W, total_frames=len(frames))  # fmt: skip
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return edit_bidirectional(engine, frames, s)
    finally:
        torch.set_num_threads(old)


def test_bidirectional_short_equals_engine(client, clip):
    from services.wire import pb

    frames = clip[:45]  # 45 frames of 73.7 KB: over the fixture's 3 MB message limit, so sent back as 41 + 4
    want = bidirectional_reference(frames, PROMPT, seed=3, steps=12)
    bidi = {"mode": pb.EDIT_MODE_BIDIRECTIONAL_SHORT, "seed": 3, "steps": 12}
    # the clip's length declared: the edit runs when its last frame arrives and answers that request (seq 5)
    res = client.stream(frames, PROMPT, chunk_frames=8, total_frames=len(frames), **bidi)
    assert np.array_equal(res.frames, want)
    out = [(r.seq, r.first_frame, r.count) for r in res.responses]
    assert out == [(i, 0, 0) for i in range(5)] + [(5, 0, 41), (5, 41, 4), (6, 45, 0)]
    assert res.finished.frames_out == 45 and res.finished.chunks == 1
    # no length given: the edit runs at `end` (seq 6)
    res = client.stream(frames, PROMPT, chunk_frames=8, **bidi)
    assert np.array_equal(res.frames, want)
    out = [(r.seq, r.first_frame, r.count) for r in res.responses]
    assert out == [(i, 0, 0) for i in range(6)] + [(6, 0, 41), (6, 41, 4)]
    assert client.get_session(res.session_id).status == "finished"


def test_bidirectional_short_bad_inputs(cluster, client, clip):
    from services.client import frames_request, open_request
    from services.wire import pb

    bidi = pb.EDIT_MODE_BIDIRECTIONAL_SHORT
    op = open_request(PROMPT, H, W, mode=bidi)
    cases = {
        "too many frames": ([op, frames_request(0, clip[:40]), frames_request(1, clip[40:50])],
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "frames request seq 1 brings the clip to 50 frames: mode bidirectional_short edits clips "
                            "of at most 49 frames (the tiny bidirectional model's clip length); 9 more fit"),
        "total too long": ([open_request(PROMPT, H, W, mode=bidi, total_frames=50)], grpc.StatusCode.INVALID_ARGUMENT,
                           "total_frames=50: mode bidirectional_short edits clips of at most 49 frames"),
        "over total": ([open_request(PROMPT, H, W, mode=bidi, total_frames=5), frames_request(0, clip[:8])],
                       grpc.StatusCode.INVALID_ARGUMENT, "more than its total_frames=5"),
        "prompt change": ([op, frames_request(0, clip[:8], prompt="other")], grpc.StatusCode.INVALID_ARGUMENT,
                          "changes the prompt"),
        "h264": ([open_request(PROMPT, H, W, mode=bidi, input_format=pb.FRAME_FORMAT_H264_ANNEXB)],
                 grpc.StatusCode.INVALID_ARGUMENT, "takes and returns RGB24"),
        "empty": ([op, pb.StreamEditRequest(end=pb.EndOfInput(seq=0))], grpc.StatusCode.INVALID_ARGUMENT,
                  "the clip is empty"),
    }  # fmt: skip
    for name, (reqs, code, text) in cases.items():
        err = _fail(client, reqs)
        assert err.code() == code, (name, err.code(), err.details())
        assert text in err.details(), (name, err.details())
    # a disconnected bidirectional session cannot be resumed (its clip was in the call)
    first = list(client.call(iter([op, frames_request(0, clip[:8])])))
    err = _fail(client, [pb.StreamEditRequest(open=pb.SessionOpen(session_id=first[0].session_id,
                                                                  resume_token=first[0].resume_token))])  # fmt: skip
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()

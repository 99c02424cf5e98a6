"""Crash-resume pieces that need no cluster: the checkpoint policy, and the H.264 decoder rebuilt from its resync
bytes (what an Ingest snapshot carries for H.264 sessions) decoding exactly like the original."""

from __future__ import annotations

import numpy as np
import pytest

from services.ingest import _H264Decoder
from services.recovery import CheckpointPolicy
from tests.services.conftest import h264_stream

H, W = 128, 192


def test_policy_cuts_must_be_a_pipeline_suffix():
    assert CheckpointPolicy(2).head == 0 and CheckpointPolicy(0).head == 3
    assert CheckpointPolicy(1, ("generator", "egress")).head == 1
    with pytest.raises(ValueError, match="suffix of the pipeline"):
        CheckpointPolicy(1, ("ingest", "egress"))
    with pytest.raises(ValueError, match=">= 0"):
        CheckpointPolicy(-1)


def test_h264_decoder_resumes_from_resync_bytes():

    from engine.testclips import make_clip

    clip = make_clip(40, H, W, seed=5)
    data = h264_stream(clip, g="8")  # an IDR (with SPS/PPS) every 8 frames
    pieces = [bytes(data[i : i + 3001]) for i in range(0, len(data), 3001)]  # cut anywhere, NAL units too
    cut = len(pieces) // 2
    a = _H264Decoder(H, W)
    before = [a.push(p, False) for p in pieces[: cut + 1]]
    resync = bytes(a.since_sps)
    assert resync.startswith(b"\x00\x00\x01\x67") and len(resync) < sum(map(len, pieces[: cut + 1])) // 2
    b = _H264Decoder.resume(H, W, resync)
    rest_a = [a.push(p, False) for p in pieces[cut + 1 :]] + [a.push(b"", True)]
    rest_b = [b.push(p, False) for p in pieces[cut + 1 :]] + [b.push(b"", True)]
    assert np.array_equal(np.concatenate(rest_a), np.concatenate(rest_b))
    assert sum(map(len, before)) + sum(map(len, rest_a)) == len(clip)

"""Crash resume: consistent checkpoint cuts across the stateful stages, and the replay log between cuts.

A *cut* is one SessionSnapshot per checkpointed stage, all taken after the same request (the gateway drives a
session's requests one at a time, so after request k every stage holds exactly the state request k left):

    ingest     VAE encoder causal conv caches + the pixel frames waiting for a full 8-frame step
               (+ for H.264 input the Annex-B bytes since the last SPS, to rebuild the decoder: services/ingest.py)
    generator  DiT cache: GDN states, softmax K/V window, FFN temporal context; prompt embeddings; source
               latents waiting for a full chunk; cursor
    egress     VAE decoder context: pending latents and the blended tail of the previous tile

plus metadata (the request the cut follows, frames in/out, prompt). The gateway stores it in the session store
(`put_checkpoint`, which empties the replay log in the same transaction) at open and then after every request
that brings the chunks finished since the last cut to `every`; every later request is appended to the replay
log as the *first checkpointed stage's input* (the client's FramesIn for Ingest; a LatentChunk for Generator /
Egress). When any checkpointed replica is lost (killed, crashed, or it no longer holds the session), the gateway
restores *every* checkpointed stage from the same cut (the surviving replicas roll back too), replays the log
with outputs dropped (the client has them: Egress decodes without encoding), checks the replayed frame count,
and runs the interrupted request again. So the stream continues with monotonic sequence numbers and output
identical to an uninterrupted run; at most `every` chunks (plus the request in flight) are recomputed.

Sizes (bytes of one cut), measured:
    tiny preset, 128x192, after 48 frames (2026, CPU): ingest 3.8 MB (VAE encoder caches 1.7 MB, pending frames
    2.1 MB as fp32), generator 0.21 MB, egress 4.7 MB; snapshot 7 / 2 / 14 ms.
    2B, 1280x704, steady state (loadtest/results/README.md, H100): VAE encoder caches 941 MB, DiT caches 350 MB,
    VAE decoder context 87 MB; the whole state snapshots (GPU -> host) in 3.85 s.
So at 2B the Ingest part dominates. Both what a cut holds and how often it is taken are configurable:
    every    chunks between cuts (0: no cuts, no crash resume); the replay log holds at most that many chunks of
             the head stage's input (raw 1280x704 frames: 65 MB per 24-frame request; H.264: ~100x less).
    stages   a suffix of the pipeline: ("ingest", "generator", "egress") (default: any replica may die), or
             ("generator", "egress") (no 941 MB encoder cache per cut; the log holds source latents, 96x smaller
             than raw frames; an Ingest loss then ends the session with UNAVAILABLE), or ("egress",).
The store cuts blobs into Redis values of at most 256 MB (services/store.py).

Non-goals: the gateway's own death (a client resumes through another gateway with its resume token; the stages
keep the session), checkpoints outside the session store (object storage).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.wire import STAGES

FULL = STAGES
"""The default cut: every stateful stage."""


@dataclass(frozen=True)
class CheckpointPolicy:
    every: int = 2
    """Chunks finished between two cuts (0: no cuts, so a lost stage ends the session)."""
    stages: tuple[str, ...] = FULL
    """The checkpointed stages: a suffix of ("ingest", "generator", "egress")."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint cadence must be >= 0 chunks, got {self.every}")
        stages = tuple(self.stages)
        suffixes = [STAGES[i:] for i in range(len(STAGES))]
        if stages not in suffixes:
            raise ValueError(
                f"checkpointed stages must be a suffix of the pipeline ({' | '.join(','.join(s) for s in suffixes)})"
                f"; got {','.join(stages) or 'none'}"
            )
        object.__setattr__(self, "stages", stages)

    @property
    def on(self) -> bool:
        return self.every > 0

    @property
    def head(self) -> int:
        """Index in STAGES of the first stage a cut restores (len(STAGES): none)."""
        return STAGES.index(self.stages[0]) if self.on else len(STAGES)


def parse_stages(text: str) -> tuple[str, ...]:
    """The CLI's "ingest,generator,egress" -> a tuple of stage names."""
    return tuple(s.strip() for s in text.split(",") if s.strip())

"""Builds the sana-stream Ray Serve application from typed arguments.

    Gateway (gRPC ingress) -> Ingest, TextEncoder, Generator, Egress, BidirectionalEditor (handles passed into its
    constructor)

`build_app(AppConfig(...))` returns the bound application; `run(cfg)` starts it on the current Ray instance
(the CLI's `serve`, tests). Replica counts per stage (bidirectional=0 leaves the whole-clip model out), the
engine preset, checkpoint cadence and contents, and gRPC limits come from `AppConfig`.
Non-goals: autoscaling policy (a later issue), k8s manifests (k8s/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.bidirectional import BidirectionalEditor
from services.egress import Egress
from services.gateway import GatewayConfig, GatewayDeployment
from services.generator import Generator
from services.ingest import Ingest
from services.recovery import FULL, CheckpointPolicy
from services.stage import EngineSpec
from services.text_encoder import TextEncoderStage

APP_NAME = "sana-stream"
STAGE_NAMES = ("gateway", "ingest", "text", "generator", "egress", "bidirectional")


@dataclass
class AppConfig:
    preset: str = "tiny"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9000
    redis_url: str | None = None
    replicas: dict[str, int] = field(default_factory=dict)
    """stage -> replicas (gateway, ingest, text, generator, egress, bidirectional); 1 each by default;
    bidirectional may be 0 (no bidirectional_short sessions)."""
    checkpoint_every: int = 2
    """Checkpoint cut cadence in finished chunks (0: no cuts, no crash resume); services/recovery.py."""
    checkpoint_stages: tuple[str, ...] = FULL
    """What a cut holds: ("ingest", "generator", "egress") or a suffix of it (services/recovery.py)."""
    bidirectional_dit_weights: str | None = None
    """The bidirectional DiT's weights (None: the preset's)."""
    bidirectional_max_frames: int = 0
    """Longest bidirectional_short clip (0: the bidirectional preset's num_frames)."""
    max_message_bytes: int = 64 << 20
    idle_timeout_s: float = 300.0
    reap_interval_s: float = 5.0
    engine: EngineSpec | None = None
    """Model building (device, dtype, weights); default EngineSpec(preset)."""
    num_gpus: float = 0.0
    """GPU share each model replica (ingest, text, generator, egress) reserves; 0 on CPU machines."""

    def __post_init__(self) -> None:
        unknown = set(self.replicas) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGE_NAMES)}")
        if any(n < (0 if stage == "bidirectional" else 1) for stage, n in self.replicas.items()):
            raise ValueError(f"replica counts must be >= 1 (bidirectional: >= 0), got {self.replicas}")
        if self.replicas.get("gateway", 1) > 1 and not self.redis_url:
            raise ValueError("more than one gateway replica needs a shared registry: pass --redis-url")
        self.policy = CheckpointPolicy(self.checkpoint_every, tuple(self.checkpoint_stages))  # validates

    def n(self, stage: str) -> int:
        return self.replicas.get(stage, 1)


def parse_replicas(items: list[str] | None) -> dict[str, int]:
    """["generator=2", "ingest=2"] -> {"generator": 2, "ingest": 2}."""
    out: dict[str, int] = {}
    for item in items or []:
        stage, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise ValueError(f"--replicas takes STAGE=N (stages: {', '.join(STAGE_NAMES)}), got {item!r}")
        out[stage] = int(count)
    return out


def build_app(cfg: AppConfig):
    spec = cfg.engine or EngineSpec(preset=cfg.preset)
    res = {"ray_actor_options": {"num_cpus": 0, "num_gpus": cfg.num_gpus}}
    ingest = Ingest.options(num_replicas=cfg.n("ingest"), **res).bind(spec)
    text = TextEncoderStage.options(num_replicas=cfg.n("text"), **res).bind(spec)
    generator = Generator.options(num_replicas=cfg.n("generator"), **res).bind(spec)
    egress = Egress.options(num_replicas=cfg.n("egress"), **res).bind(spec)
    bidi = None
    if cfg.n("bidirectional"):
        bspec = dataclasses.replace(spec, dit_weights=cfg.bidirectional_dit_weights)
        bidi = BidirectionalEditor.options(num_replicas=cfg.n("bidirectional"), **res).bind(bspec)
    gw = GatewayConfig(
        preset=spec.preset,
        grpc_host=cfg.grpc_host,
        grpc_port=cfg.grpc_port,
        redis_url=cfg.redis_url,
        max_message_bytes=cfg.max_message_bytes,
        idle_timeout_s=cfg.idle_timeout_s,
        reap_interval_s=cfg.reap_interval_s,
        checkpoint=cfg.policy,
        bidirectional_max_frames=cfg.bidirectional_max_frames,
    )
    return GatewayDeployment.options(num_replicas=cfg.n("gateway")).bind(ingest, text, generator, egress, gw, bidi)


def run(cfg: AppConfig, blocking: bool = False):
    """Deploy on the connected Ray instance (starting Serve without its HTTP proxy); returns the gateway handle."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    return serve.run(build_app(cfg), name=APP_NAME, route_prefix=None, blocking=blocking)

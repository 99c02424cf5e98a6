"""Ingress choice: a chunk's round trip through Ray Serve's gRPC proxy vs a gRPC server inside a deployment.

    python -m loadtest.ingress_overhead --out loadtest/results/ingress_overhead_cpu.json

Both ingresses serve the same bidirectional `EditService.StreamEdit`, echoing each FramesIn back as a FramesOut
with the same payload (no model work), so the difference is the transport: the proxy path is client -> proxy
actor -> (replica pulls the message from the proxy with an actor call) -> replica -> proxy -> client; the direct
path is client -> replica's own grpc.aio server -> client. One session, ping-pong (each request sent after the
previous response), payloads of one chunk of raw frames at the tiny size and of one latent-sized message.
Non-goals: concurrency/throughput (one stream), H.264.
"""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _echo(req):
    from services.wire import pb

    f = req.frames
    return pb.StreamEditResponse(frames=pb.FramesOut(seq=f.seq, count=f.count, data=f.data))


def _deployments(direct_port: int):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class ProxyEcho:
        async def StreamEdit(self, request_stream):  # noqa: N802
            async for req in request_stream:
                yield _echo(req)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class DirectEcho:
        async def __init__(self, port: int) -> None:
            import grpc

            from services.wire import pb_grpc

            class Servicer(pb_grpc.EditServiceServicer):
                async def StreamEdit(self, request_iterator, context):  # noqa: N802
                    async for req in request_iterator:
                        yield _echo(req)

            self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
            pb_grpc.add_EditServiceServicer_to_server(Servicer(), self.server)
            self.server.add_insecure_port(f"127.0.0.1:{port}")
            await self.server.start()

        async def ping(self) -> bool:
            return True

    return ProxyEcho.bind(), DirectEcho.bind(direct_port)


def pingpong(address: str, payload: bytes, n: int, metadata=()) -> list[float]:
    import grpc

    from services.wire import pb, pb_grpc

    ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                 ("grpc.max_send_message_length", 64 << 20)])  # fmt: skip
    grpc.channel_ready_future(ch).result(timeout=60)
    stub = pb_grpc.EditServiceStub(ch)
    ack: queue.Queue = queue.Queue()
    sent: list[float] = []

    def requests():
        for i in range(n):
            sent.append(time.perf_counter())
            yield pb.StreamEditRequest(frames=pb.FramesIn(seq=i, count=1, data=payload))
            ack.get(timeout=60)

    rtts = []
    for i, _ in enumerate(stub.StreamEdit(requests(), metadata=metadata)):
        rtts.append((time.perf_counter() - sent[i]) * 1e3)
        ack.put(True)
    ch.close()
    return rtts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import os

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from tests.services.conftest import free_port

    proxy_port, direct_port = free_port(), free_port()
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}})  # fmt: skip
    serve.start(
        proxy_location="HeadOnly",
        http_options={"port": free_port()},
        grpc_options=gRPCOptions(port=proxy_port,
                                 grpc_servicer_functions=["videoedit.v1.edit_pb2_grpc.add_EditServiceServicer_to_server"]),
    )  # fmt: skip
    proxy_app, direct_app = _deployments(direct_port)
    serve.run(proxy_app, name="echo_proxy", route_prefix="/echo_proxy")
    serve.run(direct_app, name="echo_direct", route_prefix=None)
    payloads = {"raw_chunk_24x128x192_rgb": 24 * 128 * 192 * 3, "latent_chunk_3x16x4x6_fp32": 3 * 16 * 4 * 6 * 4,
                "raw_chunk_24x704x1280_rgb": 24 * 704 * 1280 * 3}  # fmt: skip
    results = {}
    for _ in range(120):  # the proxy learns the new application's route asynchronously
        try:
            pingpong(f"127.0.0.1:{proxy_port}", b"x", 1, (("application", "echo_proxy"),))
            break
        except Exception:
            time.sleep(0.5)
    try:
        for name, size in payloads.items():
            data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
            row = {}
            paths = (("ray_serve_grpc_proxy", f"127.0.0.1:{proxy_port}", (("application", "echo_proxy"),)),
                     ("grpc_server_in_deployment", f"127.0.0.1:{direct_port}", ()))  # fmt: skip
            for path, addr, md in paths:
                rtt = pingpong(addr, data, args.n, md)[5:]  # first few: connection and code warm-up
                pct = np.percentile(rtt, [50, 95])
                row[path] = {"p50_ms": round(float(pct[0]), 2), "p95_ms": round(float(pct[1]), 2),
                             "mean_ms": round(float(np.mean(rtt)), 2)}  # fmt: skip
            results[name] = {"bytes": size, **row}
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": __import__("loadtest.cluster_overhead", fromlist=["machine"]).machine(),
        "command": "python -m loadtest.ingress_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": "round trip of one StreamEdit message echoed by a deployment, one stream, ping-pong",
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

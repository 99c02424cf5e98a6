"""Ray Serve deployments of sana-stream: one role per module (gateway, ingest, text_encoder, generator, egress,
bidirectional), composed by `services.app`; crash resume in `services.recovery`, tracing in `services.telemetry`;
the gRPC client in `services.client`; the serve/stream CLI in `services.cli`.

Non-goals: model code (engine/) and the wire definitions (proto/videoedit/v1/).
"""

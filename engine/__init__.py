"""sana-stream's engine: the SANA-Streaming model, its samplers and the streaming sessions."""

from engine import gpu_env

gpu_env.configure()

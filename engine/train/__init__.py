"""Training of SANA-Streaming models: V2V flow matching, the streaming DMD stage with Cycle-Reverse
Regularization, the VAE autoencoder warm-up of tiny presets, evaluation (`engine.train.evaluate`) and the CLI
(`sana-stream train`, `sana-stream eval`). Reference: SANA_STREAMING.md section 7."""

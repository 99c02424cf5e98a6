"""Training data: the procedural paired-edit dataset and JSONL manifests (see `engine.data.procedural`)."""

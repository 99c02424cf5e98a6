# sana-stream developer commands. `make demo` and `make test` each work on a fresh machine (they run setup first).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_PIN ?= torch==2.13.0
OUT ?= outputs
PYTEST_ARGS ?=

.PHONY: setup test demo lint format bench proto clean

setup: .setup-stamp

# torch first, pinned, so no CUDA build is pulled on CPU machines; then the package with its dev extras.
.setup-stamp: pyproject.toml
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	@touch $@

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The whole stack on the embedded default: local Ray, in-process registry, tiny model; a generated clip streamed
# through the gRPC service (serve + stream + stop in one process).
demo: setup
	sana-stream demo --out $(OUT) --prompt "make the red circle blue"

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: setup
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# On a GPU machine: the 2B streaming model at 1280x704 with random weights.
bench:
	sana-stream bench --preset sana-streaming-2b-ar --height 704 --width 1280 --json $(OUT)/bench.json

clean:
	rm -rf $(OUT) .setup-stamp .pytest_cache .ruff_cache *.egg-info

# Regenerate the gRPC/protobuf code from proto/videoedit/v1/*.proto (commit the result; a test fails when stale).
proto:
	$(PYTHON) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto proto/videoedit/v1/*.proto

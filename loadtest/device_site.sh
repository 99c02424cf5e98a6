#!/usr/bin/env bash
# The packages loadtest/cluster_overhead.py needs on the lent GPU machine, which has Python 3.12, torch, grpcio,
# aiohttp, pyyaml, ... but no ray, diffusers or av, and takes at most 64 MiB (working tree included) per call.
#
#     bash loadtest/device_site.sh      # -> .devcarry/ray/a/siteA.tar.xz: av, diffusers, grpcio, protobuf (~32 MB)
#                                       #    .devcarry/ray/b/siteB.tar.xz: ray (stripped) + Serve's deps (~23 MB)
#
# cp312 wheels (pinned: the versions tested here) -> one `pip install --target` tree -> ray stripped of what Serve
# on one machine never loads (Java jars, RLlib/Tune/Train/Data/LLM, dashboard web client, tests) -> two xz parts,
# each small enough to travel in one call beside the ~23 MB working tree. On the machine, in two back-to-back
# calls (it keeps /tmp while warm; loadtest/results/README.md has the exact commands):
#
#     mkdir -p /tmp/site && tar xJf .devcarry/ray/a/siteA.tar.xz -C /tmp/site      # call 1, carry .devcarry/ray/a
#     tar xJf .devcarry/ray/b/siteB.tar.xz -C /tmp/site                            # call 2, carry .devcarry/ray/b
#     export PYTHONPATH=/tmp/site:$PWD
#
# Env: WHL (wheel cache folder, default .devcarry/ray/whl), XZ (xz level, default -9), DEST (default .devcarry/ray).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=$(realpath -m "${DEST:-.devcarry/ray}")
WHL=${WHL:-$DEST/whl}
XZ=${XZ:--9}
PARTA=(av==18.1.0 diffusers==0.42.1 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
       protobuf==7.36.2)
PARTB=(ray==2.60.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4
       annotated-types==0.7.0 typing-inspection==0.4.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
       referencing==0.37.0 rpds-py==0.30.0 mmh3==5.3.1 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
       opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2
       opentelemetry-semantic-conventions==0.66b2)
TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
mkdir -p "$WHL" "$DEST/a" "$DEST/b"
python3 -m pip download -q --no-deps "${TAGS[@]}" -d "$WHL" "${PARTA[@]}" "${PARTB[@]}"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
python3 -m pip install -q --no-index --find-links "$WHL" --no-deps --no-compile "${TAGS[@]}" --target "$site" \
    "${PARTA[@]}" "${PARTB[@]}"
python3 - "$site" <<'EOF'
import os, shutil, sys

site = sys.argv[1]
ray = os.path.join(site, "ray")
for d in ("jars", "rllib", "tune", "train", "llm", "data", "workflow", "dashboard/client", "serve/llm",
          "util/dask", "util/spark", "util/collective", "util/joblib", "util/multiprocessing",
          "autoscaler/gcp", "autoscaler/aws", "autoscaler/azure", "autoscaler/_private/gcp",
          "autoscaler/_private/aws", "autoscaler/_private/_azure", "autoscaler/_private/kuberay",
          "autoscaler/_private/vsphere", "autoscaler/_private/spark", "core/src/ray/raylet/scripts"):
    shutil.rmtree(os.path.join(ray, d), ignore_errors=True)
for root, dirs, files in os.walk(ray):
    for d in [d for d in dirs if d in ("tests", "__pycache__")]:
        shutil.rmtree(os.path.join(root, d))
        dirs.remove(d)
    for f in files:
        if f.endswith((".pyi", ".pxd", ".pyx", ".map")):
            os.remove(os.path.join(root, f))
for d in os.listdir(site):  # the RECORD no longer matches the files
    if d.startswith("ray-") and d.endswith(".dist-info"):
        os.remove(os.path.join(site, d, "RECORD"))
shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)
EOF
cd "$site"
a=$(ls -d av av[.-]* diffusers diffusers-* grpc grpc_* grpcio*-* google protobuf-*)
b=$(ls | grep -v -x -F "$(printf '%s\n' $a)")
tar -cf - $a | xz "$XZ" -T0 >"$DEST/a/siteA.tar.xz"
tar -cf - $b | xz "$XZ" -T0 >"$DEST/b/siteB.tar.xz"
ls -l "$DEST/a/siteA.tar.xz" "$DEST/b/siteB.tar.xz"

#!/usr/bin/env bash
# The Performance I figures in one go, on one machine (repository root, one CUDA GPU): optionally a tile sweep
# inside the forward, then the bench RUNS times in a row (run-to-run spread is part of the figure), then the
# profile. Everything lands in OUTDIR; loadtest/results/README.md says how each pass was run and read.
#
#     bash loadtest/perf1_pass.sh OUTDIR [RUNS] [SWEEP_MATCH]
#
#   OUTDIR/tile_sweep.json     loadtest/tile_sweep.py --match SWEEP_MATCH (only when SWEEP_MATCH is given)
#   OUTDIR/bench_run{1..}.json sana-stream bench, 2B streaming model, random weights, 1280x704, bf16, six chunks
#   OUTDIR/profile.json        loadtest/profile_dit.py (kernels of a forward, replays, host timeline; not with PROFILE=0)
#   OUTDIR/summary.txt         the GPU (name, UUID, clocks) and each run's headline figures
#
# SANA_STREAM_BENCH_COMPILE defaults to 0 here: compiled blocks are slower than the graphs (third pass) and cost
# a minute each run. PROFILE=0 skips the profile. Needs diffusers importable (the bench builds the LTX-2 VAE).
# On an H100 a bench takes ~3 min, the profile ~1.5, a sweep ~20 s a variant: split a pass over device calls of at
# most 10 minutes (e.g. the sweep, one bench and the profile; then two benches with PROFILE=0).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: perf1_pass.sh OUTDIR [RUNS] [SWEEP_MATCH]}
RUNS=${2:-3}
MATCH=${3:-}
mkdir -p "$OUT"
export SANA_STREAM_BENCH_COMPILE=${SANA_STREAM_BENCH_COMPILE:-0}
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,clocks.max.mem,driver_version --format=csv,noheader \
    | tee "$OUT/summary.txt"
if [[ -n "$MATCH" ]]; then
    python3 loadtest/tile_sweep.py --match "$MATCH" --json "$OUT/tile_sweep.json"
fi
for i in $(seq 1 "$RUNS"); do
    python3 -m engine.cli bench --preset sana-streaming-2b-ar --height 704 --width 1280 --chunks 6 \
        --json "$OUT/bench_run$i.json" >"$OUT/bench_run$i.log" 2>&1 || { tail -30 "$OUT/bench_run$i.log"; exit 1; }
    rm -f "$OUT/bench_run$i.log"
done
if [[ "${PROFILE:-1}" != 0 ]]; then
    python3 loadtest/profile_dit.py --json "$OUT/profile.json"
fi
python3 - "$OUT" "$RUNS" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys

out, runs = sys.argv[1], int(sys.argv[2])
keys = ("dit_fps", "dit_ms_per_chunk", "dit_fps_graphs", "dit_fps_forward_graphs", "fast_vs_reference_rel_err")
for i in range(1, runs + 1):
    r = json.load(open(f"{out}/bench_run{i}.json"))
    batched = {b: round(v["fps_total"], 1) for b, v in r["batched"].items()}
    print(f"run {i}:", {k: round(r[k], 4 if k.endswith("err") else 2) for k in keys}, "batched", batched)
EOF

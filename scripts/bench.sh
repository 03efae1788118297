#!/usr/bin/env bash
# Reproduce the README's results: the main job on the bundled data (timed), a user's own GRU model
# exported the way any .keras file is, then every variant and baseline measured with 1 thread.
#   scripts/bench.sh            → artifacts/: model folders, pipeline.log, bench.json, bench.png, bench.md
#   OUT=/tmp/x scripts/bench.sh → another output folder
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts}"
mkdir -p "$OUT"
python -c "from edge_rnn.device.hostinfo import cpu_features, describe; print('host:', describe(cpu_features()))" | tee "$OUT/host.txt"
start=$(date +%s.%N)
edge-rnn pipeline --data sample --out "$OUT" 2>&1 | tee "$OUT/pipeline.log"
echo "pipeline wall time: $(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$start" "$(date +%s.%N)")" | tee -a "$OUT/pipeline.log"
python scripts/demo_gru.py "$OUT/gru-mnist.keras"
edge-rnn export "$OUT/gru-mnist.keras" --out "$OUT/gru-mnist"
edge-rnn bench "$OUT/mnist-lstm" "$OUT/char-rnn" "$OUT/gru-mnist" --threads 1 --opt-level all --runs 1000 --rounds 3 \
  --json "$OUT/bench.json" --plot "$OUT/bench.png"
# The README's tables, from the JSON.
python -c "import json, sys; from edge_rnn.bench.report import markdown; print(markdown(json.load(open(sys.argv[1]))), end='')" \
  "$OUT/bench.json" > "$OUT/bench.md"

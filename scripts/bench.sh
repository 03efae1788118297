#!/usr/bin/env bash
# Reproduce the README's bench table and plot: train both models on the bundled data with the
# pipeline, then measure every variant and baseline with 1 thread, 1,000 timed runs per row.
#   scripts/bench.sh            → artifacts/, bench.json, bench.png
#   OUT=/tmp/x scripts/bench.sh → another output folder
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts}"
edge-rnn pipeline --data sample --out "$OUT"
edge-rnn bench "$OUT/mnist-lstm" "$OUT/char-rnn" --threads 1 --opt-level all --runs 1000 --rounds 3 \
  --json "$OUT/bench.json" --plot "$OUT/bench.png"
# The README's table, from the JSON.
python -c "import json, sys; from edge_rnn.bench import markdown; print(markdown(json.load(open(sys.argv[1]))), end='')" \
  "$OUT/bench.json" > "$OUT/bench.md"

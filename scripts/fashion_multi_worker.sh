#!/usr/bin/env bash
# The README's full-size multi-worker figures: the 60,000-image Fashion-MNIST training set (Debian's
# `apt-get install -y dataset-fashion-mnist`), 3 epochs, global batch 32, on this one machine:
#   1. one process, Keras fit()                        (--strategy default, arrays in memory)
#   2. one process, the tf.distribute loop             (--strategy mirrored, images streamed from the IDX files)
#   3. two worker processes on 127.0.0.1               (--strategy multi-worker, streamed)
# and a table of epoch times (from each manifest's training.epoch_seconds) and held-out accuracy on the
# 10,000 test images.   OUT=/tmp/x EPOCHS=3 scripts/fashion_multi_worker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts/fashion}"
EPOCHS="${EPOCHS:-3}"
DATA=/usr/share/datasets/fashion-mnist
[ -d "$DATA" ] || { echo "error: no $DATA — apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
python -c "from edge_rnn.device.hostinfo import cpu_features, describe; print('host:', describe(cpu_features()))" | tee "$OUT/host.txt"
# Two distinct free ports, both held open while the second is chosen.
free_ports() { python -c "import socket; a, b = socket.socket(), socket.socket(); a.bind(('127.0.0.1', 0)); b.bind(('127.0.0.1', 0)); print(a.getsockname()[1], b.getsockname()[1])"; }

edge-rnn train mnist-lstm --data "$DATA" --epochs "$EPOCHS" --out "$OUT/one-fit" 2>&1 | tail -n 3
edge-rnn train mnist-lstm --data "$DATA" --stream --strategy mirrored --epochs "$EPOCHS" --out "$OUT/one-loop" 2>&1 | tail -n 3
read -r P0 P1 < <(free_ports)
WORKERS="127.0.0.1:$P0,127.0.0.1:$P1"
edge-rnn train mnist-lstm --data "$DATA" --stream --strategy multi-worker --workers "$WORKERS" --index 1 \
  --epochs "$EPOCHS" --out "$OUT/two-w1" > "$OUT/two-w1.log" 2>&1 &
W1=$!
edge-rnn train mnist-lstm --data "$DATA" --stream --strategy multi-worker --workers "$WORKERS" --index 0 \
  --epochs "$EPOCHS" --out "$OUT/two" 2>&1 | tail -n 3
wait "$W1" || { echo "error: worker 1 failed — see $OUT/two-w1.log" >&2; exit 1; }

python - "$OUT" <<'EOF' | tee "$OUT/fashion.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | workers | epoch times (s) | held-out accuracy |")
print("|---|---|---|---|")
for name, what in (("one-fit", "1 process, Keras fit()"), ("one-loop", "1 process, tf.distribute loop, streamed"),
                   ("two", "2 workers, multi-worker, streamed")):
    m = json.loads((out / name / "manifest.json").read_text())
    t = m["training"]
    print(f"| {what} | {t['workers']} | {' / '.join(f'{s:.0f}' for s in t['epoch_seconds'])} | "
          f"{m['metrics']['keras_accuracy']:.2%} |")
EOF

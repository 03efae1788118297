"""Check edge-rnn's IDX loader on the real, full-size Fashion-MNIST as Debian ships it.

Not part of the test suite (which must not need a system package): run it after
`apt-get install -y dataset-fashion-mnist` (with `sudo` as a normal user):

    python scripts/check_fashion_mnist.py
"""

from __future__ import annotations

import sys

import numpy as np

from edge_rnn.train.data import DEBIAN_FASHION_DIR, FASHION_LABELS, load_digits


def main() -> int:
    if not DEBIAN_FASHION_DIR.is_dir():
        print(f"no {DEBIAN_FASHION_DIR}: install it with `apt-get install -y dataset-fashion-mnist` (sudo as a normal user)")
        return 1
    data = load_digits(str(DEBIAN_FASHION_DIR))
    checks = {
        "60,000 training and 10,000 test images of 28×28": data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28),
        "6,000 / 1,000 per class": np.bincount(data.y_train).tolist() == [6000] * 10 and np.bincount(data.y_test).tolist() == [1000] * 10,
        "Fashion-MNIST class names": data.labels == FASHION_LABELS,
        # Clothes cover more of the frame than digits (mean pixel ~33): real Fashion-MNIST, not digits.
        "mean pixel 60–90": 60 < float(data.x_train.mean()) < 90,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"source: {data.source}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

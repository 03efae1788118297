"""The device path: `infer` runs where tensorflow, tf2onnx, keras and onnx cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from conftest import write_png

BLOCKER = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"tensorflow", "tf2onnx", "keras", "onnx"}:
                raise ImportError(f"{name} is not installed on this device")
    sys.meta_path.insert(0, _Block())
    sys.argv = ["edge-rnn"] + sys.argv[1:]
    from edge_rnn.cli import main
    try:
        main()
    finally:
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "tf2onnx", "keras", "onnx"})
        print("HEAVY_MODULES=" + ",".join(heavy), file=sys.stderr)
    """
)


def test_infer_without_tensorflow(mnist_dir, digits, tmp_path):
    png = tmp_path / "d.png"
    write_png(png, digits.x_test[0])
    npy = tmp_path / "b.npy"
    np.save(npy, digits.x_test[:20])
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, "infer", str(mnist_dir / "model.int8.onnx"), str(png), str(npy), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY_MODULES=\n" in proc.stderr
    preds = json.loads(proc.stdout)["predictions"]
    assert len(preds) == 21
    labels = np.array([int(p["label"]) for p in preds[1:]])
    assert np.mean(labels == digits.y_test[:20]) >= 0.75


def test_blocker_really_blocks():
    proc = subprocess.run([sys.executable, "-c", BLOCKER.replace("from edge_rnn.cli import main", "import tensorflow")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not installed on this device" in proc.stderr


def test_generate_without_tensorflow(char_dir):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, "generate", str(char_dir / "model.int8.onnx"), "--prime", "ROMEO:", "--length", "80", "--seed", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY_MODULES=\n" in proc.stderr
    assert proc.stdout.startswith("ROMEO:") and proc.stdout.endswith("\n") and len(proc.stdout[:-1]) == 86

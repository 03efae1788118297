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


# What device modules may import from inside the package: each other, the error types, the named
# tolerances and the version. Everything else in edge_rnn is the workstation side.
DEVICE_MAY_IMPORT = {"edge_rnn", "edge_rnn.errors", "edge_rnn.tolerances"}
DEVICE_THIRD_PARTY = {"numpy", "onnxruntime", "PIL"}


def _imports(path) -> set[str]:
    """Absolute names of every module a source file imports, at any depth (function-level imports too)."""
    import ast

    package = "edge_rnn.device"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def test_device_modules_import_nothing_from_the_training_side():
    from pathlib import Path

    import edge_rnn.device

    folder = Path(edge_rnn.device.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {"session.py", "inputs.py", "stepper.py", "runtime.py", "manifest.py", "sampling.py"} <= {p.name for p in files}
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "edge_rnn":
                assert name.startswith("edge_rnn.device") or name in DEVICE_MAY_IMPORT, f"{path.name} imports {name}"
            else:
                assert top in DEVICE_THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__", f"{path.name} imports {name}"


def test_the_boundary_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..train.lstm import train\n    import tensorflow\n", encoding="utf-8")
    assert {"edge_rnn.train.lstm", "tensorflow"} <= _imports(bad)


def test_evaluate_a_users_folder_without_tensorflow(user_models):
    # On a device: every ONNX variant scored on the user's data; the Keras source is left out, and the table says so.
    folder, data = user_models["digits"]
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "evaluate", str(folder), "--data", str(data), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY_MODULES=\n" in proc.stderr
    doc = json.loads(proc.stdout)
    assert [v["role"] for v in doc["variants"]] == ["onnx", "onnx_int8", "onnx_step", "onnx_step_int8"]
    assert any("Keras is not installed" in note for note in doc["notes"])

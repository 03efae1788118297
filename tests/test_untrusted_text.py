"""Names from files are data on the terminal: no markup, no control characters, through every command that echoes them.

One small Keras model is exported with hostile layer names and labels into a folder whose name is hostile too, then
bundled; a copy of the bundle is rewritten by hand (as anyone can: a bundle's manifest is not signed) so that a role
and a member carry rich markup (`[/]` crashed rich's printer) and escape sequences (an OSC title change, an SGR
colour, a right-to-left override). Every command that prints those names must exit as usual, print no raw control
or bidi character, show the names escaped and visible, and never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.cli import _print_as_made, app
from edge_rnn.device.text import MAX_NAME_CHARS, shown

keras = pytest.importorskip("keras")

runner = CliRunner()

OSC_TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title
SGR_RED = "\x1b[31m"  # colours everything after it
RLO = "\u202e"  # shows what follows right to left
LAYER = f"lstm[bold red]x[\\]{OSC_TITLE}{SGR_RED}{RLO}"  # Keras names take anything but '/'
OUTPUT = f"y[bold]{SGR_RED}{RLO}"
LABELS = ["a[/]b", OSC_TITLE, f"[bold red]x[/]{SGR_RED}{RLO}"]
FOLDER = f"m[bold]{SGR_RED}{RLO}"  # file names take anything but '/' and NUL
BUNDLE = f"b[bold]{SGR_RED}{RLO}.tar.gz"
ROLE = f"onnx[/]{OSC_TITLE}{RLO}"
MEMBER = f"m[bold red]{SGR_RED}{RLO}.onnx"
DATA_FILE = f"d[bold]{OSC_TITLE}.npz"
DATA_NAME = f"d[/]{OSC_TITLE}.npz"  # as a bundle records it (a name, not a path: it may hold '/')
# What must never reach the terminal raw: C0 controls but newline, DEL, C1, bidi controls, separators, surrogates.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    raw = RAW.search(result.output)
    assert raw is None, (repr(raw.group()), result.output)
    return result.output


def unwrapped(text: str) -> str:
    """rich's output with the line breaks it adds at 80 columns (the test's terminal) taken out."""
    return text.replace("\n", "")


# ---------------------------------------------------------------------------------------------
# The helper


def test_shown_makes_control_and_bidi_characters_visible():
    assert shown(f"a{OSC_TITLE}b{SGR_RED}c{RLO}d\x9b\x7f\udcff\u2066") == "a\\x1b]0;pwned\\x07b\\x1b[31mc\\u202ed\\x9b\\x7f\\udcff\\u2066"
    assert shown("line\nbreak\ttab\r") == "line\\x0abreak\\x09tab\\x0d"
    assert shown("[bold red]x[/] é 中 ✓") == "[bold red]x[/] é 中 ✓"  # markup is rich's business; printable text is kept
    assert shown("a\nb\tc\x1b", keep="\n\t", limit=None) == "a\nb\tc\\x1b"
    assert shown(42) == "42"


def test_shown_cuts_long_names_in_the_middle():
    long = "head-" + "x" * 1000 + "-tail.onnx"
    cut = shown(long)
    assert len(cut) == MAX_NAME_CHARS and cut.startswith("head-") and cut.endswith("-tail.onnx") and "…" in cut
    assert shown(long, limit=None) == long
    assert shown("x" * MAX_NAME_CHARS) == "x" * MAX_NAME_CHARS


def test_generated_text_keeps_newlines_but_not_escapes(capsys):
    """generate/sample print a model's characters: a vocabulary holding ESC must not drive the terminal."""
    _print_as_made("ROMEO:\n", iter(["ab", f"{OSC_TITLE}\n", "c\td"]))
    assert capsys.readouterr().out == "ROMEO:\nab\\x1b]0;pwned\\x07\nc\td\n"


# ---------------------------------------------------------------------------------------------
# A model whose names are hostile, its bundle, and a hand-made bundle with hostile roles and members


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((None, 3), name="x"), layers.LSTM(4, name=LAYER), layers.Dense(3, activation="softmax", name=OUTPUT)])
    model.save(root / "hx.keras")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    folder = root / FOLDER
    exported = run("export", root / "hx.keras", "--out", folder, "--labels", root / "labels.txt")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == LABELS and LAYER in [a["layer"] for a in manifest["audit"]]
    rng = np.random.default_rng(0)
    output = manifest["io"]["outputs"][0]["name"]
    np.savez(root / DATA_FILE, x=rng.random((40, 6, 3), dtype=np.float32), **{output: rng.integers(0, 3, 40)})
    np.save(root / "x.npy", rng.random((2, 6, 3), dtype=np.float32))
    np.save(root / "seq.npy", rng.random((4, 3), dtype=np.float32))
    bundled = run("bundle", folder, "--variant", "fp32", "--variant", "step", "--data", root / DATA_FILE, "-o", root / BUNDLE)
    return {"root": root, "folder": folder, "bundle": root / BUNDLE, "exported": exported, "bundled": bundled}


def _rewrite_bundle(src, dst, *, role: str, member: str, data_name: str) -> None:
    """The bundle with role `onnx` renamed `role`, its member renamed `member`, and the data's file name `data_name`."""
    with tarfile.open(src, "r:gz") as tar:
        members = {info.name: tar.extractfile(info).read() for info in tar}
    manifest = json.loads(members.pop("manifest.json"))
    entry = manifest["files"].pop("onnx")
    members[member] = members.pop(entry["path"])
    manifest["files"][role] = {**entry, "path": member}
    manifest["bundle"]["roles"] = [role if r == "onnx" else r for r in manifest["bundle"]["roles"]]
    for block in (manifest["reference"]["tolerances"], manifest["data_metrics"]["roles"], manifest["graphs"]):
        block[role] = block.pop("onnx")
    manifest["data_metrics"]["data"] = data_name
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def hostile_bundle(hostile):
    path = hostile["root"] / f"r{BUNDLE}"
    _rewrite_bundle(hostile["bundle"], path, role=ROLE, member=MEMBER, data_name=DATA_NAME)
    return path


# ---------------------------------------------------------------------------------------------
# Every command that echoes them


def test_export_and_bundle_print_names_as_data(hostile):
    # The folder's name is printed with each file: its markup kept as text, its escapes visible.
    assert shown(FOLDER) + "/model.onnx" in hostile["exported"]
    assert "graph audit" in hostile["exported"]  # the table holding the layer names was printed
    assert shown(BUNDLE) in hostile["bundled"] and "recorded at bundling" in hostile["bundled"]


def test_infer_shows_labels_escaped_and_json_keeps_them_exact(hostile):
    folder, root = hostile["folder"], hostile["root"]
    text = run("infer", folder / "model.onnx", root / "x.npy", "--top-k", "3")
    assert shown(OSC_TITLE) in text and "a[/]b" in text and shown(LABELS[2]) in text
    doc = json.loads(run("infer", folder / "model.onnx", root / "x.npy", "--top-k", "3", "--json"))
    assert sorted(t["label"] for t in doc["predictions"][0]["top"]) == sorted(LABELS)  # JSON escapes, the data is kept


def test_stream_prints_json_lines(hostile):
    lines = run("stream", hostile["folder"] / "model.step.onnx", "--input", hostile["root"] / "seq.npy").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_check_evaluate_quantize_and_ort_on_the_folder(hostile, tmp_path):
    import shutil

    folder = tmp_path / FOLDER
    shutil.copytree(hostile["folder"], folder)
    run("check", folder, "--runtime", "onnxruntime", "--batch", "8")  # the folder's name is in the table's title
    run("evaluate", folder, "--data", hostile["root"] / DATA_FILE)
    assert shown(FOLDER) in unwrapped(run("quantize", folder))
    assert shown(FOLDER) in unwrapped(run("ort", folder, "--variant", "fp32"))


def test_verify_prints_hostile_roles_and_members(hostile, hostile_bundle):
    text = unwrapped(run("verify", hostile_bundle, "--run"))
    assert shown(MEMBER) in text and shown(ROLE) in text and "every member matches" in text


def test_a_hostile_role_runs_and_is_named_escaped(hostile, hostile_bundle):
    root = hostile["root"]
    run("infer", hostile_bundle, root / "x.npy", "--role", ROLE)
    run("evaluate", hostile_bundle, "--data", root / DATA_FILE)  # its table names the hostile role
    run("check", hostile_bundle, "--role", ROLE, "--runtime", "onnxruntime", "--batch", "8")  # BUNDLE:MEMBER in the title


def test_error_messages_escape_what_they_quote(hostile, hostile_bundle):
    root = hostile["root"]
    line = run("infer", hostile_bundle, root / "x.npy", "--role", f"nope[/]{SGR_RED}", code=1).strip()
    assert line.startswith("error:") and "\n" not in line and shown(f"nope[/]{SGR_RED}") in line and shown(ROLE) in line
    missing = root / f"gone[/]{OSC_TITLE}.npy"
    line = run("infer", hostile["folder"] / "model.onnx", missing, code=1).strip()
    assert line.startswith("error:") and shown(missing.name) in line

"""A new user's first hour at an 80-column terminal: every table edge-rnn prints shows its figures whole (no "…", no
line past 80 characters), `-h` is `--help` everywhere, and `bench --quick` is short, says so, and keeps the libraries'
log noise (onnxruntime.quantization's protobuf dumps, tf2onnx, TensorFlow, LiteRT) off the terminal.

Real models throughout (tests/conftest.py); each command runs through the CLI with COLUMNS=80."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from edge_rnn import cli
from edge_rnn.cli import _ms, _per_s, app

WIDTH = 80
# What reached the terminal before bench kept the libraries quiet.
NOISE = ("WARNING:root", "elem_type", "unk__", "dim_param", "Please consider to run pre-processing", "XNNPACK", "- tf2onnx", "tf2onnx.tfonnx",
         "UserWarning", "DeprecationWarning", "W0000", "I0000", "oneDNN")


@pytest.fixture(autouse=True)
def fresh_console(monkeypatch):
    """The CLI's consoles are made on first use: a fresh one reads COLUMNS of the run at hand."""
    monkeypatch.setattr(cli.out, "_console", None)
    monkeypatch.setattr(cli.err, "_console", None)


def run(*args, width: int = WIDTH):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})


def assert_fits(text: str, width: int = WIDTH) -> None:
    """No line past `width`, no cell cut with "…"."""
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}\n{text}"
    assert "…" not in text, text


def table_part(text: str, prose: tuple[str, ...]) -> str:
    """The output up to the first line of prose printed after the tables (lines that wrap in the terminal, not tables)."""
    lines = text.splitlines()
    ends = [i for i, line in enumerate(lines) if line.startswith(prose)]
    return "\n".join(lines[: ends[0]] if ends else lines)


def sections(text: str, models: list[str]) -> dict[str, list[str]]:
    """The lines of each model's bench table, from its title to the next model's."""
    lines = text.splitlines()
    starts = {m: next(i for i, line in enumerate(lines) if f"edge-rnn bench {m} " in line) for m in models}
    order = sorted(starts, key=starts.get)
    return {m: lines[starts[m] : starts[order[k + 1]] if k + 1 < len(order) else len(lines)] for k, m in enumerate(order)}


def assert_rows_shown(doc: dict, text: str) -> None:
    """Every result row of the JSON is a line of its model's table: variant, runtime, KiB, p50 and the largest
    batch's throughput whole, and its accuracy (or max |Δ|) where the table has the column."""
    models = list(dict.fromkeys(r["model"] for r in doc["results"]))
    big = str(doc["config"]["batch_sizes"][-1])
    by_model = sections(text, models)
    for r in doc["results"]:
        lines = [line.split() for line in by_model[r["model"]] if line.split()[:2] == [r["variant"], r["runtime"]]]
        assert len(lines) == 1, (r["model"], r["variant"], r["runtime"], text)
        cells = lines[0]
        assert cells[2] == f"{r['size_bytes'] / 1024:,.0f}", cells
        assert cells[3] == _ms(r["latency_ms"]["p50"]), (cells, r["latency_ms"])
        assert _per_s(r["throughput_per_s"][big]) in cells, (cells, r["throughput_per_s"])
        if r["accuracy"] is not None:
            figure = f"{r['accuracy']:.2%}" if r["metric"].endswith("accuracy") else f"{r['accuracy']:.4f}"
            assert figure in cells, (figure, cells)
        if r["agreement_with_fp32"] is not None:
            assert f"{r['agreement_with_fp32']:.2%}" in cells, cells


# ---------------------------------------------------------------------------------------------------
# -h


@pytest.mark.parametrize("command", [[], ["train"], ["train", "mnist-lstm"], ["train", "char-rnn"], ["export"], ["quantize"],
                                     ["ort"], ["infer"], ["generate"], ["stream"], ["bundle"], ["verify"], ["sample"], ["bench"],
                                     ["check"], ["evaluate"], ["pipeline"]])
def test_dash_h_is_help(command):
    short, long = run(*command, "-h"), run(*command, "--help")
    assert short.exit_code == 0, short.output
    assert "Usage: " in short.output and short.output == long.output


def test_every_command_takes_dash_h():
    """The list above is every command the app has."""
    import typer.main

    group = typer.main.get_command(app)
    names = set(group.commands) | {f"train {n}" for n in group.commands["train"].commands}
    assert names == {"train", "train mnist-lstm", "train char-rnn", "export", "quantize", "ort", "infer", "generate", "stream",
                     "bundle", "verify", "sample", "bench", "check", "evaluate", "pipeline"}


# ---------------------------------------------------------------------------------------------------
# bench


def test_bench_quick_built_ins_at_80_columns(tmp_path, mnist_dir, char_dir, capfd):
    dirs = [shutil.copytree(d, tmp_path / d.name) for d in (mnist_dir, char_dir)]
    path = tmp_path / "bench.json"
    result = run("bench", *dirs, "--quick", "--json", path)
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    # Quick, and the JSON says so: one round, a tenth of a second of timing per row.
    assert doc["config"]["quick"] is True and doc["config"]["rounds"] == 1
    assert doc["config"]["min_seconds"] == pytest.approx(0.1) and doc["config"]["throughput_seconds"] == pytest.approx(0.05)
    assert all(r["runs"] >= 20 for r in doc["results"])
    assert "QUICK" in result.stdout and "indicative" in result.stdout
    assert_fits(result.output)
    assert_rows_shown(doc, result.stdout)
    # Both models measured with their own rows (and LiteRT's, where installed, on the classifier).
    rows = {(r["model"], r["variant"], r["runtime"]) for r in doc["results"]}
    assert {("mnist-lstm", "int8", "onnxruntime"), ("char-rnn", "fp64", "numpy")} <= rows
    # Targets keep their figures whole.
    for t in doc["targets"]:
        assert f"{t['ratio']:.3g}" in result.stdout, t
    # Every runtime row missing says why, one note each.
    assert "no openvino" in result.output.replace("\n", " ") or ("mnist-lstm", "fp32", "openvino") in rows
    captured = capfd.readouterr()
    for noise in NOISE:
        assert noise not in result.output and noise not in captured.err, noise


def test_bench_quick_user_model_with_data(tmp_path, user_models, capfd):
    folder, data = user_models["digits"]
    work = shutil.copytree(folder, tmp_path / "digits")
    path = tmp_path / "bench.json"
    result = run("bench", work, "--quick", "--data", data, "--json", path)
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["config"]["quick"] is True
    assert_fits(result.output)
    assert_rows_shown(doc, result.stdout)
    # The metric's 95% interval is shown whole (it wraps under the figure, never cut).
    fp32 = next(r for r in doc["results"] if (r["variant"], r["runtime"]) == ("fp32", "onnxruntime"))
    low, high = fp32["accuracy_interval"]
    assert f"({low:.1%}–{high:.1%})" in result.stdout
    # A user's model gets LiteRT rows (its Keras model converted at the timed shapes) where ai-edge-litert is installed,
    # the fp32 one answering as onnxruntime fp32 does; else one line says why. No keras-predict row, and a line says why.
    flat = " ".join(result.output.split())
    runtimes = {r["runtime"] for r in doc["results"]}
    litert = {r["variant"]: r for r in doc["results"] if r["runtime"] == "litert"}
    if importlib.util.find_spec("ai_edge_litert") is not None:
        assert set(litert) == {"fp32", "int8"} and all(r["size_bytes"] > 0 and r["latency_ms"]["p50"] > 0 for r in litert.values())
        assert max(litert["fp32"]["max_abs_diff"].values()) <= 1e-5 and litert["fp32"]["accuracy_interval"]
        assert max(litert["int8"]["max_abs_diff"].values()) < 0.2
    else:
        assert not litert and "no LiteRT rows: ai-edge-litert is not installed" in flat
    assert "keras-predict" not in runtimes and "no keras-predict row:" in flat
    for runtime in ("openvino", "tract"):
        assert runtime in runtimes or f"no {runtime} row: it is not installed" in flat
    # Not judged by the built-in models' targets: a pick per use instead, with the figure behind it.
    assert "targets (batch-1" not in result.stdout and "int8 file / fp32 file" not in result.stdout
    assert doc["config"]["kinds"] == {"digits": "outputs"}
    own = [r for r in doc["results"] if not r["variant"].endswith("-plain") and r["variant"] != "step"]
    uses = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines() if line.startswith(("smallest", "fastest", "most"))}
    smallest = min(own, key=lambda r: (r["size_bytes"], r["latency_ms"]["p50"]))
    assert f"{smallest['variant']} {smallest['runtime']}" in uses["smallest file"]
    assert f"{smallest['size_bytes'] / 1024:,.0f} KiB" in uses["smallest file"]
    fastest = min(own, key=lambda r: r["latency_ms"]["p50"])
    assert f"{fastest['variant']} {fastest['runtime']}" in uses["fastest at batch 1"]
    assert f"{_ms(fastest['latency_ms']['p50'])} ms" in uses["fastest at batch 1"]
    best = max(own, key=lambda r: (r["accuracy"], -r["size_bytes"]))
    assert f"{best['variant']} {best['runtime']}" in uses["most accurate"] and f"{best['accuracy']:.2%}" in uses["most accurate"]
    # The caption says what the picks are among, and what the -plain rows are (they were unexplained).
    assert "Picks among your model's own files." in flat and "targets are the built-in" not in flat
    plain = sorted({r["variant"] for r in doc["results"] if r["variant"].endswith("-plain")})
    assert plain and f"{', '.join(plain)}: tf2onnx's plain export, a baseline, not a pick." in flat
    captured = capfd.readouterr()
    for noise in NOISE:
        assert noise not in result.output and noise not in captured.err, noise


def test_bench_wide_shows_every_column_and_still_cuts_nothing(tmp_path, user_models):
    folder, _ = user_models["co2"]
    work = shutil.copytree(folder, tmp_path / "co2")
    path = tmp_path / "bench.json"
    result = run("bench", work, "--quick", "--wide", "--json", path)
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert_fits(result.output)
    # Too wide for 80 columns: each row is drawn as `header value` lines, every figure whole.
    for header in ("load ms", "p90 ms", "/s @64", "peak MB"):
        assert header in result.stdout
    for r in doc["results"]:
        assert _ms(r["load_ms"]) in result.stdout and _ms(r["latency_ms"]["p90"]) in result.stdout


# ---------------------------------------------------------------------------------------------------
# check, evaluate, export's audit, bundle and verify


CHECK_PROSE = ("tolerance:", "not installed", "WRONG", "cannot load", "ok ", "wrong answers")


def test_check_table_at_80_columns(mnist_dir):
    args = ("check", mnist_dir, "--runtime", "onnxruntime", "--runtime", "openvino", "--runtime", "tract", "--allow-wrong")
    doc = json.loads(run(*args, "--json").stdout)
    result = run(*args)
    assert result.exit_code == 0, result.output
    table = table_part(result.stdout, CHECK_PROSE)
    assert_fits(table)
    ort = next(r for r in doc["results"] if r["runtime"] == "onnxruntime")
    line = next(line for line in table.splitlines() if line.startswith("onnxruntime"))
    # The version, every input set's max |Δ| and top-1 agreement are whole.
    assert ort["version"] in line
    for name, diffs in ort["max_abs_diff"].items():
        assert f"{max(diffs.values()):.1e}" in line, (name, line)
    assert f"{ort['agreement']:.2%}" in line and ort["status"] in line
    assert any(line.startswith("tract") for line in table.splitlines())


def test_check_table_narrower_than_its_columns_is_drawn_row_by_row(mnist_dir):
    result = run("check", mnist_dir, "--runtime", "onnxruntime", width=40)
    assert result.exit_code == 0, result.output
    table = table_part(result.stdout, CHECK_PROSE)
    assert_fits(table, width=40)
    lines = [line.split() for line in table.splitlines()]
    assert ["runtime", "onnxruntime"] in lines and ["answers", "ok"] in lines


def test_evaluate_table_at_80_columns(user_models):
    folder, data = user_models["digits"]
    doc = json.loads(run("evaluate", folder, "--data", data, "--json").stdout)
    result = run("evaluate", folder, "--data", data)
    assert result.exit_code == 0, result.output
    table = table_part(result.stdout, ("FAIL",))
    assert_fits(table)
    assert doc["variants"] and all(v["metric"] == "accuracy" for v in doc["variants"])
    for v in doc["variants"]:
        line = next(line for line in table.splitlines() if line.split()[:1] == [v["role"]])
        # The figure and both ends of its 95% interval, whole.
        assert f"{100 * v['value']:.2f}%" in line and f"{100 * v['low']:.2f}–{100 * v['high']:.2f}%" in line, line


def test_export_audit_table_at_80_columns(tmp_path, user_models):
    folder, _ = user_models["text"]
    result = run("export", folder / "model.keras", "--out", tmp_path / "text")
    assert result.exit_code == 0, result.output
    table = table_part(result.stdout, ("parity", str(tmp_path)))
    assert "graph audit" in table
    assert_fits(table)


def test_bundle_and_verify_tables_at_80_columns(tmp_path, user_models):
    folder, data = user_models["digits"]
    bundle = tmp_path / "digits.tar.gz"
    made = run("bundle", folder, "--variant", "int8", "--data", data, "-o", bundle)
    assert made.exit_code == 0, made.output
    assert_fits(made.stdout)
    assert "recorded at bundling" in made.stdout
    checked = run("verify", bundle, "--run")
    assert checked.exit_code == 0, checked.output
    assert "self-test" in checked.stdout and "recorded at bundling" in checked.stdout
    # The member lines shorten each sha256 to its first 12 digits with "…" on purpose; the tables cut nothing.
    assert_fits("\n".join(line for line in checked.stdout.splitlines() if "sha256" not in line))


def test_training_history_table_at_80_columns(tmp_path):
    result = run("train", "mnist-lstm", "--data", "sample", "--epochs", 1, "--out", tmp_path / "mnist")
    assert result.exit_code == 0, result.output
    table = table_part(result.stdout[result.stdout.index("training history"):], ("held-out",))
    assert_fits(table)
    # Epoch 1's loss, accuracy and their held-out twins, each whole to 4 decimals.
    line = next(line.split() for line in table.splitlines() if line.split()[:1] == ["1"])
    assert len(line) >= 3 and all(re.fullmatch(r"\d+\.\d{4}", cell) for cell in line[1:]), line

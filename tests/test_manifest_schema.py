"""Manifests are checked against one schema each (device/schema.py) when they are read: the project's own folders
and bundles pass, and a field of the wrong type, range or length fails every command in one line naming the field."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error, write_png
from edge_rnn.cli import app
from edge_rnn.device.bundle import open_bundle
from edge_rnn.device.manifest import load_manifest
from edge_rnn.device.schema import BUNDLE_MANIFEST, FOLDER_FIELDS, FOLDER_MANIFEST, validate

runner = CliRunner()


def cli(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def make_bundle(source, out, *options):
    result = cli("bundle", source, *options, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bundles(mnist_dir, char_dir, tmp_path_factory):
    """The project's bundles: mnist (int8 + step) and the char RNN (fp32 + int8)."""
    out = tmp_path_factory.mktemp("schema-bundles")
    return {"mnist": make_bundle(mnist_dir, out / "mnist.tar.gz", "--variant", "int8", "--variant", "step"),
            "char": make_bundle(char_dir, out / "char.tar.gz", "--variant", "fp32", "--variant", "int8")}


@pytest.fixture(scope="module")
def data_bundle(user_models, tmp_path_factory):
    """A user's classifier bundled with its labelled data (the reference's data block, data_metrics)."""
    folder, data = user_models["digits"]
    return make_bundle(folder, tmp_path_factory.mktemp("schema-bundles") / "digits.tar.gz",
                       "--variant", "fp32", "--variant", "int8", "--data", data)


def bundle_manifest(path) -> dict:
    with tarfile.open(path, "r:gz") as tar:
        return json.loads(tar.extractfile("manifest.json").read())


def test_the_projects_own_manifests_pass(mnist_dir, char_dir, user_models, bundles, data_bundle):
    folders = [mnist_dir, char_dir, *(folder for folder, _ in user_models.values())]
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        validate(manifest, FOLDER_MANIFEST, where=folder, hint="")
        load_manifest(folder)
        # Every block edge-rnn writes is typed: a new one needs its schema (known keys pass unchecked otherwise).
        assert set(manifest) <= set(FOLDER_FIELDS), set(manifest) - set(FOLDER_FIELDS)
    for path in (*bundles.values(), data_bundle):
        manifest = bundle_manifest(path)
        validate(manifest, BUNDLE_MANIFEST, where=path, hint="")
        open_bundle(path)
        assert set(manifest) <= set(BUNDLE_MANIFEST.fields), set(manifest) - set(BUNDLE_MANIFEST.fields)
    assert "data_metrics" in bundle_manifest(data_bundle) and "data" in bundle_manifest(data_bundle)["reference"]


# ---------------------------------------------------------------------------------------------
# A wrong field, through the CLI: exit 1, one line naming the field and what it holds, no traceback


def _set(path: str, value):
    """An edit of a manifest: the field at `path` (keys and list indices, dot-separated) set to `value`."""
    def edit(manifest: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value(node[last]) if callable(value) else value
    return edit


def _model_name(manifest: dict) -> None:
    manifest["model"] = "x" * 5000


def _roles(manifest: dict) -> None:
    manifest["bundle"]["roles"] = [f"role{i}" for i in range(65)]


def folder_copy(source, tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    if edit is not None:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bundle_copy(source, tmp_path, edit):
    """The bundle with its manifest member edited (the members it lists are unchanged)."""
    with tarfile.open(source, "r:gz") as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    manifest = json.loads(members[0][1])
    if edit is not None:
        edit(manifest)
    members[0] = (members[0][0], json.dumps(manifest).encode())
    path = tmp_path / "edited.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# (command, what it runs on, the edit, fragments of the one line).
CASES = {
    "infer: labels as an object": (
        "infer", "mnist", _set("labels", {"0": "zero"}), ["manifest.json: labels must be a list (≤ 1,000,000 items) or null",
                                                          "got an object of 1 entry"]),
    "infer: a shape as a string": (
        "infer", "mnist", _set("io.inputs.0.shape", "batch"), ["io.inputs[0].shape must be a list (≤ 8 items)", 'got "batch"']),
    "infer: a scale as a string": (
        "infer", "mnist", _set("preprocessing.scale", "0.5"), ["preprocessing.scale must be a number", 'got "0.5"']),
    "stream: a state size as a string": (
        "stream", "char", _set("step.state.0.shape.1", str), ["step.state[0].shape[1] must be an integer ≥ 1", 'got "']),
    "stream: a 5,000-character name": (
        "stream", "char", _model_name, ["model must be a non-empty string (≤ 4,096 characters)", "(5,000 characters)"]),
    "bundle: a size as a string": (
        "bundle", "mnist", _set("files.onnx.bytes", str), ["files.onnx.bytes must be an integer ≥ 0", 'got "']),
    "bundle: a vocabulary as a string": (
        "bundle", "char", _set("vocab", "abc"), ["vocab must be a list (≤ 1,000,000 items)", 'got "abc"']),
    "verify: roles as a number": (
        "verify", "mnist-bundle", _set("bundle.roles", 3), ["member 'manifest.json': bundle.roles must be a list (≤ 64 items), got 3"]),
    "verify: 65 roles": (
        "verify", "mnist-bundle", _roles, ["bundle.roles must be a list (≤ 64 items), got a list of 65 items"]),
    "verify: a tolerance as a string": (
        "verify --run", "mnist-bundle", _set("reference.tolerances.onnx_int8.probs.atol", "abc"),
        ['reference.tolerances.onnx_int8.probs.atol must be a number ≥ 0, got "abc"']),
    "check: a member list holding a number": (
        "check", "mnist-bundle", _set("reference.inputs", ["input", 7]), ["reference.inputs[1] must be a non-empty string", "got 7"]),
    "check: an agreement over 1": (
        "check", "char-bundle", _set("reference.tolerances.onnx.logits.argmax_min", 2),
        ["reference.tolerances.onnx.logits.argmax_min must be a number from 0 to 1 or null, got 2"]),
}


@pytest.fixture()
def command(mnist_dir, char_dir, bundles, digits, tmp_path):
    """(command, target, edit) → the CLI's result on a copy of the target with its manifest edited (None: as it is)."""
    png = tmp_path / "digit.png"
    write_png(png, digits.x_test[0])
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([1, 2, 3], np.int64))
    sources = {"mnist": mnist_dir, "char": char_dir, "mnist-bundle": bundles["mnist"], "char-bundle": bundles["char"]}

    def run(name: str, target: str, edit):
        where = tmp_path / ("control" if edit is None else "edited")
        where.mkdir()
        if target.endswith("bundle"):
            path = bundle_copy(sources[target], where, edit)
        else:
            path = folder_copy(sources[target], where, edit)
        args = {
            "infer": ["infer", path / "model.onnx", png],
            "stream": ["stream", path / "model.onnx", "--input", ids],
            "bundle": ["bundle", path, "--variant", "fp32", "-o", where / "out.tar.gz"],
            "verify": ["verify", path],
            "verify --run": ["verify", path, "--run"],
            "check": ["check", path, "--runtime", "onnxruntime", "--batch", "4"],
        }[name]
        return cli(*args)

    return run


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_field_is_one_line_naming_it(command, case):
    name, target, edit = CASES[case][:3]
    control = command(name, target, None)
    assert control.exit_code == 0, control.output  # the command runs on the unedited copy
    one_line_error(command(name, target, edit), *CASES[case][3])

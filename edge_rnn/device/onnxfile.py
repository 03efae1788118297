"""Checks on an ONNX file's bytes before any parser that follows external-data paths sees them.

Device path: the standard library only (the device has no `onnx` package, and onnxruntime's Python API
does not expose a model's tensors before it has loaded them).

A TensorProto may keep its data in another file (`data_location = EXTERNAL`, `external_data` = location,
offset, length); onnxruntime and `onnx.load` open that path relative to the model, and have followed
`../` and absolute paths out of the model folder (CVE-2022-25882, CVE-2024-27318). edge-rnn writes every
weight inside the .onnx file, and the manifest's sha256 covers that one file only, so the policy is simple:
any tensor with external data is refused, wherever its location points. The walk reads the protobuf wire
format along the paths where a TensorProto can sit: graph initializers (dense and sparse), node attributes
(`t`, `tensors`, `sparse_tensor(s)`), subgraphs (`g`, `graphs`, nested up to MAX_GRAPH_DEPTH) and
functions. Bytes that are not well-formed protobuf are refused as not an ONNX model.
"""

from __future__ import annotations

import os

from ..errors import ModelFileError

# The device's models are a few MB; a file over this cap is refused before it is read.
MAX_ONNX_BYTES = 512 * 1024 * 1024
# Loop/If/Scan bodies nest graphs; real models nest a few levels, and the walk recurses once per level.
MAX_GRAPH_DEPTH = 32

# Field numbers from onnx.proto (stable since IR version 3).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1


class _Corrupt(Exception):
    pass


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt(pos)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: memoryview, start: int, end: int):
    """(field number, wire type, value) of one message: ints for varints, (start, end) for length-delimited."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt(pos)
        if wire == 0:
            value, pos = _varint(data, pos, end)
        elif wire == 1 or wire == 5:
            value, pos = None, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:  # groups (3, 4) are not used by onnx.proto
            raise _Corrupt(pos)
        if pos > end:
            raise _Corrupt(pos)
        yield number, wire, value


def _submessages(data: memoryview, span: tuple[int, int], wanted: dict[int, str]):
    for number, wire, value in _fields(data, *span):
        if number in wanted:
            if wire != 2:
                raise _Corrupt(span[0])
            yield wanted[number], value


def _text(data: memoryview, span: tuple[int, int]) -> str:
    return bytes(data[span[0]:span[1]][:200]).decode("utf-8", "replace")


def _tensor(data: memoryview, span: tuple[int, int], where: str) -> None:
    name, location, external = "?", None, False
    for number, wire, value in _fields(data, *span):
        if number == _TENSOR_NAME and wire == 2:
            name = _text(data, value)
        elif number == _TENSOR_DATA_LOCATION and wire == 0 and value == _EXTERNAL:
            external = True
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            external = True
            entry = {n: v for n, w, v in _fields(data, *value) if w == 2}
            if entry.get(_ENTRY_KEY) and _text(data, entry[_ENTRY_KEY]) == "location" and _ENTRY_VALUE in entry:
                location = _text(data, entry[_ENTRY_VALUE])
    if external:
        raise ModelFileError(
            f"{where}: tensor {name!r} keeps its data in an external file ({location!r}) — edge-rnn refuses external data "
            "(only the .onnx file is covered by the manifest's sha256); re-export with the weights inside the file"
        )


def _sparse(data: memoryview, span: tuple[int, int], where: str) -> None:
    for _, sub in _submessages(data, span, {_SPARSE_VALUES: "t", _SPARSE_INDICES: "t"}):
        _tensor(data, sub, where)


def _nodes(data: memoryview, span: tuple[int, int], node_field: int, where: str, depth: int) -> None:
    for _, node in _submessages(data, span, {node_field: "node"}):
        for _, attr in _submessages(data, node, {_NODE_ATTRIBUTE: "attr"}):
            kinds = {_ATTR_T: "t", _ATTR_TENSORS: "t", _ATTR_G: "g", _ATTR_GRAPHS: "g", _ATTR_SPARSE: "s", _ATTR_SPARSES: "s"}
            for kind, sub in _submessages(data, attr, kinds):
                if kind == "t":
                    _tensor(data, sub, where)
                elif kind == "s":
                    _sparse(data, sub, where)
                else:
                    _graph(data, sub, where, depth + 1)


def _graph(data: memoryview, span: tuple[int, int], where: str, depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise ModelFileError(f"{where} nests subgraphs over {MAX_GRAPH_DEPTH} levels deep — not an edge-rnn model")
    wanted = {_GRAPH_INITIALIZER: "t", _GRAPH_SPARSE_INITIALIZER: "s"}
    for kind, sub in _submessages(data, span, wanted):
        (_tensor if kind == "t" else _sparse)(data, sub, where)
    _nodes(data, span, _GRAPH_NODE, where, depth)


def check_onnx_bytes(data: bytes | memoryview, *, where: object) -> None:
    """Refuse (ModelFileError) bytes that are empty, over MAX_ONNX_BYTES, not protobuf, or use external data."""
    if len(data) == 0:
        raise ModelFileError(f"{where} is empty — not an ONNX model; re-export it")
    if len(data) > MAX_ONNX_BYTES:
        raise ModelFileError(f"{where} is {len(data):,} bytes, over the {MAX_ONNX_BYTES:,}-byte cap for a model file")
    view = memoryview(data)
    try:
        has_graph = False
        for kind, span in _submessages(view, (0, len(view)), {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"}):
            if kind == "graph":
                has_graph = True
                _graph(view, span, str(where), 1)
            else:
                _nodes(view, span, _FUNCTION_NODE, str(where), 1)
    except _Corrupt as exc:
        raise ModelFileError(f"{where} is not an ONNX model (malformed or truncated protobuf near byte {exc.args[0]}) — re-export it") from None
    if not has_graph:
        raise ModelFileError(f"{where} holds no ONNX graph — not an ONNX model; re-export it")


def check_onnx_file(path: object) -> None:
    """check_onnx_bytes on a file, its size checked against MAX_ONNX_BYTES before it is read."""
    size = os.stat(path).st_size
    if size > MAX_ONNX_BYTES:
        raise ModelFileError(f"{path} is {size:,} bytes, over the {MAX_ONNX_BYTES:,}-byte cap for a model file")
    with open(path, "rb") as f:
        check_onnx_bytes(f.read(), where=path)


_NODE_OP_TYPE = 4


def _count_ops(data: memoryview, span: tuple[int, int], node_field: int, counts: dict[str, int], depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise _Corrupt(span[0])
    for _, node in _submessages(data, span, {node_field: "node"}):
        for number, wire, value in _fields(data, *node):
            if number == _NODE_OP_TYPE and wire == 2:
                op = _text(data, value)
                counts[op] = counts.get(op, 0) + 1
            elif number == _NODE_ATTRIBUTE and wire == 2:
                for _, graph in _submessages(data, value, {_ATTR_G: "g", _ATTR_GRAPHS: "g"}):
                    _count_ops(data, graph, _GRAPH_NODE, counts, depth + 1)


def op_counts(data: bytes | memoryview, *, where: object) -> dict[str, int]:
    """{op type: number of nodes} of an ONNX model's bytes, over its graph, subgraphs and functions (no onnx package)."""
    view = memoryview(data)
    counts: dict[str, int] = {}
    try:
        for kind, span in _submessages(view, (0, len(view)), {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"}):
            _count_ops(view, span, _GRAPH_NODE if kind == "graph" else _FUNCTION_NODE, counts, 1)
    except _Corrupt as exc:
        raise ModelFileError(f"{where} is not an ONNX model (malformed or truncated protobuf near byte {exc.args[0]}) — re-export it") from None
    return counts

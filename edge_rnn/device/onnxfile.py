"""Checks on an ONNX file's bytes before any parser that follows external-data paths, or allocates what a tensor
declares, sees them.

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

The same walk refuses three kinds of hostile graph before onnxruntime, onnx or the quantizer meets them (they
answer with tracebacks, or allocate first and fail after): a tensor declaring more elements than the file could
hold (its dims are read before anything is allocated: a Constant of dims [2**20, 2**20] and no data asks for 4 TiB),
a node of a domain no runtime edge-rnn targets knows (ONNX's own, onnxruntime's `com.microsoft`, or a function the
model defines), and a graph whose nodes form a cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelFileError

# The device's models are a few MB; a file over this cap is refused before it is read.
MAX_ONNX_BYTES = 512 * 1024 * 1024
# Loop/If/Scan bodies nest graphs; real models nest a few levels, and the walk recurses once per level.
MAX_GRAPH_DEPTH = 32

# Node domains the runtimes edge-rnn targets implement: ONNX's (spelled "" or "ai.onnx"), ONNX-ML's, and onnxruntime's
# contrib ops (DynamicQuantizeLSTM and the other quantized forms onnxruntime.quantization writes).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Field numbers from onnx.proto (stable since IR version 3).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE, _FUNCTION_DOMAIN = 7, 10
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES, _SPARSE_DIMS = 1, 2, 3
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 1, 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1
# An element stored in a TensorProto takes at least half a byte (4-bit types pack two to a byte; every other type,
# raw or in a packed repeated field, at least one): a tensor inside a file of N bytes holds at most 2·N elements.
_ELEMENTS_PER_BYTE = 2
_SHOWN_DIMS = 8


@dataclass
class _Walk:
    """What the walk checks against: the file's name and size, and the domains its nodes may use."""

    where: str
    size: int
    domains: frozenset[str] = KNOWN_DOMAINS


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


def _dims(data: memoryview, wire: int, value, *, at: int) -> list[int]:
    """A repeated int64 field: one varint (unpacked) or a packed run of them. Negative dims read as huge."""
    if wire == 0:
        return [value]
    if wire != 2:
        raise _Corrupt(at)
    dims, pos = [], value[0]
    while pos < value[1]:
        dim, pos = _varint(data, pos, value[1])
        dims.append(dim)
    return dims


def _shape_text(dims: list[int]) -> str:
    shown = [str(d if d < 2**63 else d - 2**64) for d in dims[:_SHOWN_DIMS]]
    return "[" + ", ".join(shown + (["…"] if len(dims) > _SHOWN_DIMS else [])) + "]"


def _elements(dims: list[int]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _tensor(data: memoryview, span: tuple[int, int], walk: _Walk) -> None:
    where = walk.where
    name, location, external, dims = "?", None, False, []
    for number, wire, value in _fields(data, *span):
        if number == _TENSOR_DIMS:
            dims += _dims(data, wire, value, at=span[0])
        elif number == _TENSOR_NAME and wire == 2:
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
    elements = _elements(dims)
    if elements > _ELEMENTS_PER_BYTE * walk.size:
        raise ModelFileError(
            f"{where}: tensor {name!r} declares shape {_shape_text(dims)} ({elements:,} elements), more than the "
            f"{walk.size:,}-byte file can hold — its data is missing and a runtime would allocate it; not an edge-rnn model"
        )


def _sparse(data: memoryview, span: tuple[int, int], walk: _Walk) -> None:
    dims: list[int] = []
    name = "?"
    for number, wire, value in _fields(data, *span):
        if number == _SPARSE_DIMS:
            dims += _dims(data, wire, value, at=span[0])
        elif number in (_SPARSE_VALUES, _SPARSE_INDICES):
            if wire != 2:
                raise _Corrupt(span[0])
            _tensor(data, value, walk)
            if number == _SPARSE_VALUES:
                name = next((_text(data, v) for n, w, v in _fields(data, *value) if n == _TENSOR_NAME and w == 2), name)
    # Runtimes make a sparse initializer dense: its dense shape is bounded by the cap on a whole model file.
    if _elements(dims) > MAX_ONNX_BYTES:
        raise ModelFileError(
            f"{walk.where}: sparse tensor {name!r} declares dense shape {_shape_text(dims)} ({_elements(dims):,} elements), "
            f"over the {MAX_ONNX_BYTES:,}-element cap — a runtime would allocate it densely; not an edge-rnn model"
        )


def _node_label(name: str, op: str) -> str:
    return f"{name!r} ({op})" if name else op


def _nodes(data: memoryview, span: tuple[int, int], node_field: int, walk: _Walk, depth: int) -> None:
    """Every node of a graph or function: its domain known, its tensors and subgraphs walked; then no cycle."""
    links: list[tuple[str, list[bytes], list[bytes]]] = []  # (label, inputs, outputs) per node, in file order
    for _, node in _submessages(data, span, {node_field: "node"}):
        name, op, domain, inputs, outputs = "", "?", "", [], []
        for number, wire, value in _fields(data, *node):
            if wire != 2:
                continue
            if number == _NODE_INPUT:
                inputs.append(bytes(data[value[0]:value[1]]))
            elif number == _NODE_OUTPUT:
                outputs.append(bytes(data[value[0]:value[1]]))
            elif number == _NODE_NAME:
                name = _text(data, value)
            elif number == _NODE_OP_TYPE:
                op = _text(data, value)
            elif number == _NODE_DOMAIN:
                domain = _text(data, value)
            elif number == _NODE_ATTRIBUTE:
                kinds = {_ATTR_T: "t", _ATTR_TENSORS: "t", _ATTR_G: "g", _ATTR_GRAPHS: "g", _ATTR_SPARSE: "s", _ATTR_SPARSES: "s"}
                for kind, sub in _submessages(data, value, kinds):
                    if kind == "t":
                        _tensor(data, sub, walk)
                    elif kind == "s":
                        _sparse(data, sub, walk)
                    else:
                        _graph(data, sub, walk, depth + 1)
        if domain not in walk.domains:
            raise ModelFileError(
                f"{walk.where}: node {_node_label(name, op)} is of domain {domain!r}, which no runtime edge-rnn targets knows "
                "(ONNX's own ops, onnxruntime's com.microsoft ones, or a function the model defines) — not an edge-rnn model"
            )
        links.append((_node_label(name, op), inputs, outputs))
    _check_acyclic(links, walk)


def _check_acyclic(links: list[tuple[str, list[bytes], list[bytes]]], walk: _Walk) -> None:
    """Refuse nodes that depend on each other's outputs in a cycle (Kahn's algorithm over the graph's own names;
    names from an outer graph or the inputs have no producer here)."""
    producer = {out: i for i, (_, _, outputs) in enumerate(links) for out in outputs if out}
    needs = [{producer[name] for name in inputs if name in producer} for _, inputs, _ in links]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for j in deps:
            users.setdefault(j, []).append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for user in users.get(i, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done < len(links):
        # Every node left waits on another left: walking back along those, the first node met twice is on a cycle.
        stuck = {i for i, n in enumerate(waiting) if n}
        path, i = [], min(stuck)
        while i not in path:
            path.append(i)
            i = min(j for j in needs[i] if j in stuck)
        raise ModelFileError(f"{walk.where}: its graph has a cycle through node {links[i][0]} (its nodes need each other's "
                             "outputs) — not a graph any runtime can run; not an edge-rnn model")


def _graph(data: memoryview, span: tuple[int, int], walk: _Walk, depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise ModelFileError(f"{walk.where} nests subgraphs over {MAX_GRAPH_DEPTH} levels deep — not an edge-rnn model")
    wanted = {_GRAPH_INITIALIZER: "t", _GRAPH_SPARSE_INITIALIZER: "s"}
    for kind, sub in _submessages(data, span, wanted):
        (_tensor if kind == "t" else _sparse)(data, sub, walk)
    _nodes(data, span, _GRAPH_NODE, walk, depth)


def check_onnx_bytes(data: bytes | memoryview, *, where: object) -> None:
    """Refuse (ModelFileError) bytes that are empty, over MAX_ONNX_BYTES, not protobuf, use external data, declare a
    tensor the file cannot hold, use an unknown op domain, or hold a cycle."""
    if len(data) == 0:
        raise ModelFileError(f"{where} is empty — not an ONNX model; re-export it")
    if len(data) > MAX_ONNX_BYTES:
        raise ModelFileError(f"{where} is {len(data):,} bytes, over the {MAX_ONNX_BYTES:,}-byte cap for a model file")
    view = memoryview(data)
    try:
        parts = list(_submessages(view, (0, len(view)), {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"}))
        # Functions the model defines are ops of their own domain.
        defined = {_text(view, v) for kind, span in parts if kind == "function" for n, w, v in _fields(view, *span)
                   if n == _FUNCTION_DOMAIN and w == 2}
        walk = _Walk(str(where), len(view), KNOWN_DOMAINS | defined)
        has_graph = False
        for kind, span in parts:
            if kind == "graph":
                has_graph = True
                _graph(view, span, walk, 1)
            else:
                _nodes(view, span, _FUNCTION_NODE, walk, 1)
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

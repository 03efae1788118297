"""Clean the scaffolding tf2onnx puts around fused LSTM/GRU/RNN ops, rewriting only what is provably equal.

Each rewrite keeps the computed function bit-for-bit (same kernels, same inputs to them):

1. zero initial states: an `initial_h` / `initial_c` input that is provably all-zero is dropped — an omitted
   initial state is zero by the ONNX spec. "Provably" is structural: zero constants, `ConstantOfShape` of
   zero, and shape/layout/dtype ops (Expand, Tile, Unsqueeze, Cast, Concat of zeros, ...) over them.
2. last time step: `Slice(Squeeze(Y))` taking the last step of a forward direction (or the first step of a
   reverse one) is `Y_h` of that direction, when no `sequence_lens` is given.
3. transpose pairs: `Transpose(p2)(Transpose(p1)(x))` becomes one Transpose, or none when the perms cancel.
4. unused outputs of recurrent ops (`Y`, `Y_h`, `Y_c`) are dropped, so the kernel does not write the whole
   sequence when only the last step is read; then dead nodes and unread initializers go.

Not done: folding the batch-major Transpose into `layout=1` — onnxruntime's CPU LSTM/GRU/RNN kernels (and
DynamicQuantizeLSTM, which shares LSTMBase) reject layout=1 at session creation.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# Input positions of the optional initial states (LSTM: initial_h, initial_c; GRU/RNN: initial_h).
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
SEQUENCE_LENS_INPUT = 4
# A Slice end at or past this is "to the end" for any sequence that fits in memory.
SLICE_TO_END = 2**31 - 1

# Ops whose output is all-zero when their data input (position 0) is all-zero, whatever the other inputs.
_ZERO_IF_DATA_ZERO = {
    "Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
    "Expand", "Tile", "Slice", "Gather", "Neg", "Relu", "Abs",
}  # fmt: skip
_STRING = onnx.TensorProto.STRING


def clean_recurrent_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Return a cleaned copy of `model` (same inputs, outputs and values) and a report of what changed."""
    model = _copy(model)
    g = model.graph
    report: dict = {
        "nodes_before": len(g.node),
        "ops_before": dict(Counter(n.op_type for n in g.node)),
        "zero_states_dropped": [],
        "last_step_to_y_h": [],
        "transposes_folded": [],
        "outputs_dropped": [],
    }
    _drop_zero_states(g, report)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    _last_step_to_y_h(g, report, opset)
    _fold_transpose_pairs(g, report)
    nodes, inits = _eliminate_dead(g)  # first, so that dead readers of Y do not keep Y alive
    _drop_unused_outputs(g, report)
    more_nodes, more_inits = _eliminate_dead(g)
    report["removed_nodes"] = nodes + more_nodes
    report["removed_initializers"] = inits + more_inits
    _prune_value_info(g)
    report["nodes_after"] = len(g.node)
    report["ops_after"] = dict(Counter(n.op_type for n in g.node))
    return model, report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _label(node: onnx.NodeProto) -> str:
    """A node's name for the report; unnamed nodes go by their first output."""
    return node.name or f"{node.op_type}->{next((o for o in node.output if o), '')}"


def _is_recurrent(node: onnx.NodeProto) -> bool:
    return node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


class _Graph:
    """Read-only indexes over a graph: producers, constants (initializers and Constant nodes), consumers."""

    def __init__(self, g: onnx.GraphProto):
        runtime_inputs = {i.name for i in g.input}  # an initializer that is also an input can be overridden
        self.consts = {t.name: t for t in g.initializer if t.name not in runtime_inputs}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for name in _all_inputs(n):
                self.consumers.setdefault(name, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self._zero: dict[str, bool] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant (initializer or Constant node), else None."""
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        a = node.attribute[0]
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(a))
        return None

    def is_zero(self, name: str) -> bool:
        """True when `name` is provably all-zero for every input to the graph."""
        if name not in self._zero:
            self._zero[name] = False  # cycles (impossible in a valid graph) count as "not provable"
            self._zero[name] = self._prove_zero(name)
        return self._zero[name]

    def _prove_zero(self, name: str) -> bool:
        value = self.const(name)
        if value is not None:
            return value.dtype != object and value.size > 0 and not np.any(value)
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        op = node.op_type
        if op == "ConstantOfShape":
            fill = _attr(node, "value")
            return fill is None or not np.any(numpy_helper.to_array(fill))
        if op == "Cast" and _attr(node, "to") == _STRING:
            return False
        if op in _ZERO_IF_DATA_ZERO:
            return self.is_zero(node.input[0])
        if op == "Concat":
            return all(self.is_zero(i) for i in node.input if i)
        if op == "Mul":
            # 0 * x is NaN for x = inf or NaN, so the other factor must be zero or a finite constant.
            a, b = node.input
            return (self.is_zero(a) and self._zero_or_finite(b)) or (self.is_zero(b) and self._zero_or_finite(a))
        return False

    def _zero_or_finite(self, name: str) -> bool:
        value = self.const(name)
        if value is not None and np.issubdtype(value.dtype, np.number):
            return bool(np.all(np.isfinite(value)))
        return self.is_zero(name)


def _all_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name `node` reads, including outer-scope names read inside its subgraphs."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local |= {o for n in sub.node for o in n.output}
            for n in sub.node:
                names |= _all_inputs(n) - local
            names |= {o.name for o in sub.output} - local
    return names


def _drop_zero_states(g: onnx.GraphProto, report: dict) -> None:
    idx = _Graph(g)
    for node in g.node:
        if not _is_recurrent(node):
            continue
        for i in STATE_INPUTS[node.op_type]:
            name = _input(node, i)
            if name and idx.is_zero(name):
                node.input[i] = ""
                report["zero_states_dropped"].append({"node": _label(node), "input": i, "tensor": name})
        while node.input and not node.input[-1]:
            node.input.pop()


def _direction(node: onnx.NodeProto) -> str:
    direction = _attr(node, "direction", b"forward")
    return direction.decode() if isinstance(direction, bytes) else direction


def _direction_of(node: onnx.NodeProto, d: int) -> str:
    """'forward' or 'reverse': how direction `d` of a recurrent op walks the sequence."""
    direction = _direction(node)
    return ("forward", "reverse")[d] if direction == "bidirectional" else direction


def _num_directions(node: onnx.NodeProto) -> int:
    return 2 if _direction(node) == "bidirectional" else 1


def _slice_args(idx: _Graph, node: onnx.NodeProto) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of a Slice with constant arguments, else None."""
    args = [idx.const(_input(node, i)) if _input(node, i) else None for i in range(1, 5)]
    starts, ends, axes, steps = args
    if starts is None or ends is None or (_input(node, 3) and axes is None) or (_input(node, 4) and steps is None):
        return None
    starts, ends = starts.ravel().tolist(), ends.ravel().tolist()
    axes = list(range(len(starts))) if axes is None else axes.ravel().tolist()
    steps = [1] * len(starts) if steps is None else steps.ravel().tolist()
    return starts, ends, axes, steps


def _squeeze_axes(idx: _Graph, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        axes = idx.const(node.input[1])
        return None if axes is None else axes.ravel().tolist()
    return _attr(node, "axes")


def _selected_direction(idx: _Graph, name: str) -> tuple[onnx.NodeProto, int] | None:
    """If `name` is Y of one direction of a recurrent op as (seq, batch, hidden), return (op, direction)."""
    sq = idx.producer.get(name)
    if sq is None or sq.op_type != "Squeeze" or _squeeze_axes(idx, sq) not in ([1], [-3]):
        return None
    src = sq.input[0]
    d = 0
    sl = idx.producer.get(src)
    if sl is not None and sl.op_type == "Slice":  # Y[:, d:d+1] of a bidirectional op
        args = _slice_args(idx, sl)
        if args is None or len(args[0]) != 1 or args[2][0] not in (1, -3) or args[3][0] != 1:
            return None
        d, end = args[0][0], args[1][0]
        if d not in (0, 1) or end != d + 1:
            return None
        src = sl.input[0]
    rnn = idx.producer.get(src)
    if rnn is None or not _is_recurrent(rnn) or rnn.output[0] != src:
        return None
    if _attr(rnn, "layout", 0) != 0 or _input(rnn, SEQUENCE_LENS_INPUT):
        return None  # with sequence_lens, Y_h is each sequence's own last step, not Y[-1]
    if d >= _num_directions(rnn):
        return None
    return rnn, d


def _last_step_to_y_h(g: onnx.GraphProto, report: dict, opset: int) -> None:
    idx = _Graph(g)
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    for k, node in enumerate(g.node):
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
            continue
        found = _selected_direction(idx, node.input[0])
        args = _slice_args(idx, node)
        if found is None or args is None or len(args[0]) != 1:
            continue
        rnn, d = found
        (start,), (end,), (axis,), (step,) = args
        if axis not in (0, -3) or step != 1:
            continue
        forward = _direction_of(rnn, d) == "forward"
        takes_last = start == -1 and end >= SLICE_TO_END
        takes_first = start == 0 and end == 1
        if not ((forward and takes_last) or (not forward and takes_first)):
            continue
        if _num_directions(rnn) == 2 and opset < 10:
            continue  # Slice took attributes before opset 10; not worth a second code path
        y_h = _ensure_output(g, rnn, 1)
        if _num_directions(rnn) == 2:  # Y_h[d:d+1], shape (1, batch, hidden) like the Slice it replaces
            y_h = _add_slice(g, new_nodes, k, y_h, d, f"{node.output[0]}/y_h")
        _redirect(g, new_nodes, k, node.output[0], y_h)
        report["last_step_to_y_h"].append({"slice": _label(node), "op": _label(rnn), "direction": d})
    for k, new in sorted(new_nodes, key=lambda p: p[0], reverse=True):
        g.node.insert(k, new)


def _ensure_output(g: onnx.GraphProto, node: onnx.NodeProto, i: int) -> str:
    """Name of output `i` of `node`, giving it a fresh name if it was omitted."""
    while len(node.output) <= i:
        node.output.append("")
    if not node.output[i]:
        node.output[i] = _fresh(g, f"{node.name or node.op_type}/output_{i}")
    return node.output[i]


def _fresh(g: onnx.GraphProto, base: str) -> str:
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _add_slice(g: onnx.GraphProto, new_nodes: list, k: int, src: str, d: int, base: str) -> str:
    out = _fresh(g, base)
    consts = []
    for suffix, v in (("starts", d), ("ends", d + 1), ("axes", 0)):
        t = numpy_helper.from_array(np.array([v], np.int64), _fresh(g, f"{base}/{suffix}"))
        g.initializer.append(t)
        consts.append(t.name)
    new_nodes.append((k + 1, helper.make_node("Slice", [src, *consts], [out], name=out)))
    return out


def _redirect(g: onnx.GraphProto, new_nodes: list, k: int, old: str, new: str) -> None:
    """Make every reader of `old` read `new`; a graph output keeps its name through an Identity."""
    for node in g.node:
        _rename_input(node, old, new)
    for _, node in new_nodes:
        _rename_input(node, old, new)
    if old in {o.name for o in g.output}:
        producer = next(n for n in g.node if old in n.output)
        producer.output[list(producer.output).index(old)] = _fresh(g, f"{old}/replaced")
        new_nodes.append((k + 1, helper.make_node("Identity", [new], [old], name=_fresh(g, f"{old}/identity"))))


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
    for a in node.attribute:  # outer-scope reads inside subgraphs (no subgraph redefines tf2onnx names)
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                _rename_input(n, old, new)
            for o in sub.output:
                if o.name == old:
                    o.name = new


def _fold_transpose_pairs(g: onnx.GraphProto, report: dict) -> None:
    idx = _Graph(g)
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    for k, node in enumerate(g.node):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        first = idx.producer.get(node.input[0])
        if first is None or first.op_type != "Transpose" or first.domain not in ("", "ai.onnx"):
            continue
        p1, p2 = _attr(first, "perm"), _attr(node, "perm")
        if p1 is None or p2 is None or len(p1) != len(p2):
            continue  # a missing perm reverses the axes, which needs the rank; leave it
        perm = [p1[j] for j in p2]  # out[i] = x.axis(p1[p2[i]])
        entry = {"first": _label(first), "second": _label(node), "perm": perm}
        if perm == list(range(len(perm))):
            _redirect(g, new_nodes, k, node.output[0], first.input[0])
            entry["perm"] = None
        else:
            node.input[0] = first.input[0]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("perm", perm))
        report["transposes_folded"].append(entry)
        idx = _Graph(g)  # chains of three or more fold one pair at a time
    for k, new in sorted(new_nodes, key=lambda p: p[0], reverse=True):
        g.node.insert(k, new)


def _drop_unused_outputs(g: onnx.GraphProto, report: dict) -> None:
    idx = _Graph(g)
    for node in g.node:
        if not _is_recurrent(node):
            continue
        for i, name in enumerate(node.output):  # every output of LSTM/GRU/RNN is optional
            if name and name not in idx.consumers and name not in idx.graph_outputs:
                node.output[i] = ""
                report["outputs_dropped"].append({"node": _label(node), "output": i, "tensor": name})
        while node.output and not node.output[-1]:
            node.output.pop()


def _eliminate_dead(g: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """Remove nodes none of whose outputs reach a graph output, then unread initializers."""
    live = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in live for o in node.output if o):
            live |= _all_inputs(node)
            keep.append(True)
        else:
            keep.append(False)
    keep.reverse()
    removed = [_label(n) for n, alive in zip(g.node, keep) if not alive]
    kept = [n for n, alive in zip(g.node, keep) if alive]
    del g.node[:]
    g.node.extend(kept)
    live |= {i.name for i in g.input}  # an initializer that is also an input is its default: keep it
    dead_inits = [t.name for t in g.initializer if t.name not in live]
    kept_inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return removed, dead_inits


def _prune_value_info(g: onnx.GraphProto) -> None:
    names = {o for n in g.node for o in n.output}
    kept = [v for v in g.value_info if v.name in names]
    del g.value_info[:]
    g.value_info.extend(kept)

"""Just enough of the ONNX protobuf wire format to expose a VITS graph's durations, without the `onnx` package.

A Piper voice's graph returns only `output` (audio padded to the longest item of a batch). To cut a batched
result back into its items, chorus needs each item's length, which the graph computes as the sum of its
`w_ceil` tensor (frames per phoneme id, zero for padding) times the hop length. Piper's own
`patch_voice_with_alignment.py` exposes that tensor by marking the output of the graph's one `Ceil` node as a
graph output; this module does the same edit on the serialized bytes: ModelProto field 7 is the GraphProto,
whose field 1 holds NodeProtos (2 = output names, 4 = op_type) and field 12 the graph outputs
(ValueInfoProto, field 1 = name). Everything else, initializers included, is copied untouched.
"""
from __future__ import annotations

from typing import Iterator

_LEN = 2  # wire type of length-delimited fields


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, tag start, value start, value end) of each field in buf[start:end]."""
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        tag_start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, new = _varint(buf, pos)
        elif wire == 1:
            new = pos + 8
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            new = pos + length
        elif wire == 5:
            new = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if new > end:
            raise ValueError("truncated protobuf")
        yield field, wire, tag_start, pos, new
        pos = new


def _strings(buf: memoryview, start: int, end: int, field_no: int) -> list[str]:
    return [bytes(buf[s:e]).decode("utf-8") for f, w, _, s, e in _fields(buf, start, end) if f == field_no and w == _LEN]


def _graph_span(model: memoryview) -> tuple[int, int, int]:
    for field, wire, tag_start, start, end in _fields(model):
        if field == 7 and wire == _LEN:
            return tag_start, start, end
    raise ValueError("no graph in this ONNX model")


def ops_and_outputs(model: bytes) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """[(op_type, output names) per node], [graph output names] of a serialized ONNX model."""
    view = memoryview(model)
    _, g_start, g_end = _graph_span(view)
    nodes, outputs = [], []
    for field, wire, _, start, end in _fields(view, g_start, g_end):
        if field == 1 and wire == _LEN:
            ops = _strings(view, start, end, 4)
            nodes.append((ops[0] if ops else "", _strings(view, start, end, 2)))
        elif field == 12 and wire == _LEN:
            names = _strings(view, start, end, 1)
            outputs.append(names[0] if names else "")
    return nodes, outputs


def durations_tensor(model: bytes) -> str | None:
    """The name of the graph's one `Ceil` output (VITS's w_ceil), or None when there is not exactly one."""
    nodes, _ = ops_and_outputs(model)
    names = {name for op, outs in nodes if op == "Ceil" for name in outs}
    return next(iter(names)) if len(names) == 1 else None


def add_output(model: bytes, name: str) -> bytes:
    """The model with tensor `name` added to the graph's outputs (shape and type left for the runtime to infer)."""
    view = memoryview(model)
    tag_start, g_start, g_end = _graph_span(view)
    name_bytes = name.encode("utf-8")
    value_info = b"\x0a" + _encode_varint(len(name_bytes)) + name_bytes  # ValueInfoProto.name (field 1)
    extra = b"\x62" + _encode_varint(len(value_info)) + value_info  # GraphProto.output (field 12)
    graph_len = g_end - g_start + len(extra)
    return b"".join((view[:tag_start], b"\x3a", _encode_varint(graph_len), view[g_start:g_end], extra, view[g_end:]))

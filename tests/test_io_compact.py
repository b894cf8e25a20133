"""--compact: short internal names and no intermediate shape annotations, with the outputs unchanged bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt.io import compact_proto, serialize_model

from tests.graphs import conv_stack, streaming_if_model
from tests.helpers import run_model, to_ir


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every intermediate shape annotated (what a pass chain hands the writer)."""
    return onnx.shape_inference.infer_shapes(proto)


@pytest.mark.parametrize("build, feeds", [
    (lambda: conv_stack(width=8, size=16), [{"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}]),
    # branches read outer-scope weights and the graph input: one rename map must reach inside them
    (lambda: streaming_if_model(width=16), [{"x": np.random.default_rng(s).standard_normal((3, 16)).astype(np.float32) * k}
                                           for s, k in ((0, 1.0), (1, 5.0), (2, -5.0))]),
], ids=["conv_stack", "nested_if"])
def test_compact_is_lossless_and_smaller(build, feeds) -> None:  # type: ignore[no-untyped-def]
    original = _inferred(build())
    assert len(original.graph.value_info) > 0
    model = to_ir(original)
    plain, compact = serialize_model(model), serialize_model(model, compact=True)
    proto = onnx.ModelProto()
    proto.ParseFromString(compact)
    onnx.checker.check_model(proto, full_check=True)
    assert len(compact) < len(plain)
    assert not proto.graph.value_info and all(not n.name for n in proto.graph.node)
    assert [v.name for v in proto.graph.input] == [v.name for v in original.graph.input]
    assert [v.name for v in proto.graph.output] == [v.name for v in original.graph.output]
    internal = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    assert max(len(n) for n in internal - {v.name for v in proto.graph.output}) <= 2
    for feed in feeds:
        for want, got in zip(run_model(original, feed), run_model(proto, feed)):
            np.testing.assert_array_equal(got, want)


def test_compact_proto_is_idempotent() -> None:
    proto = conv_stack(width=4, size=8)
    before = proto.SerializeToString()
    compact_proto(proto)
    compact_proto(proto)  # twice is the same as once
    again = onnx.ModelProto()
    again.CopyFrom(proto)
    compact_proto(again)
    assert again.SerializeToString() == proto.SerializeToString()
    assert len(proto.SerializeToString()) <= len(before)


def test_compact_drops_the_exporters_node_metadata_in_every_graph() -> None:
    """PyTorch's dynamo exporter writes each node's FX stack trace into metadata_props (a fifth of Silero VAD's op18
    file); ORT reads none of it."""
    proto = streaming_if_model(width=16)
    for graph in [proto.graph, *(a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)]:
        for node in graph.node:
            entry = node.metadata_props.add()
            entry.key, entry.value = "pkg.torch.onnx.stack_trace", "File model.py, line 1, in forward\n" * 20
    compact = onnx.ModelProto()
    compact.CopyFrom(proto)
    compact_proto(compact)
    nodes = [n for g in [compact.graph, *(a.g for n in compact.graph.node for a in n.attribute
                                          if a.type == onnx.AttributeProto.GRAPH)] for n in g.node]
    assert nodes and not any(n.metadata_props for n in nodes)
    assert len(compact.SerializeToString()) < len(proto.SerializeToString()) // 2
    feed = {"x": np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)}
    for want, got in zip(run_model(proto, feed), run_model(compact, feed)):
        np.testing.assert_array_equal(got, want)

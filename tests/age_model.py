"""A tiny age-estimation ONNX model built offline for tests (no real model can be downloaded here):
its "age" is 100 × the mean of the normalised input, so a white image reads as an adult and a
black one as a child. Only the input/output contract is real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_age_model(path: Path, size: int = 8) -> Path:
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, size, size])
    y = helper.make_tensor_value_info("age", TensorProto.FLOAT, [1, 1])
    scale = numpy_helper.from_array(np.array([[100.0]], dtype=np.float32), "scale")
    axes = numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["pixels", "axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean2"]),
        helper.make_node("Mul", ["mean2", "scale"], ["age"]),
    ]
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    graph = helper.make_graph(nodes, "tiny-age", [x], [y], initializer=[scale, axes, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path

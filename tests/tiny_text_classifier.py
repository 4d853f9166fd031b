"""Builds a tiny ONNX text classifier for the tests: hashed bag of words -> sigmoid per label.

One linear layer, weights chosen by hand so that given trigger words push given labels over 0.5
and everything else stays near 0. It follows the contract in `safety.text_classifier`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from safety.normalize import normalize
from safety.tokens import tokenize


def build(path: Path, triggers: dict[str, int], labels: int, dim: int = 4096) -> Path:
    """`triggers`: word -> index of the label it lights up."""
    weights = np.zeros((dim, labels), dtype=np.float32)
    for word, label in triggers.items():
        (canon,) = tokenize(normalize(word)).canon
        weights[zlib.crc32(canon.encode("utf-8")) % dim, label] = 40.0
    bias = np.full((labels,), -5.0, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["probabilities"])],
        "tiny_text_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", labels])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path

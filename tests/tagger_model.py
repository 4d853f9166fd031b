"""A tiny WD-style ONNX image tagger built offline for tests (no real tagger can be downloaded here).

The real contract: one NHWC BGR float input (0-255) and one sigmoid output per row of a
`selected_tags.csv` (tag_id,name,category,count; category 9 rating, 0 general, 4 character). Its
"vision" is the image's mean colour: reddish images get `red_background` and the character
`hatsune_miku`, bluish ones the age-related tag `loli`, greenish ones the rating `explicit`; every
image gets `1girl` and `solo`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

G_MINUS_R, R_MINUS_G, B_MINUS_R = (0, 20, -20), (0, -20, 20), (20, 0, -20)  # weights on (B, G, R) means
ZERO = (0, 0, 0)
# name, category, weights, bias
TAGS = [
    ("general", 9, tuple(-w for w in G_MINUS_R), 1.0),
    ("sensitive", 9, ZERO, -5.0),
    ("questionable", 9, ZERO, -5.0),
    ("explicit", 9, G_MINUS_R, -3.0),
    ("1girl", 0, ZERO, 3.0),
    ("solo", 0, ZERO, 1.0),
    ("red_background", 0, R_MINUS_G, -3.0),
    ("loli", 0, B_MINUS_R, -3.0),
    ("^_^", 0, ZERO, -5.0),
    ("hatsune_miku", 4, R_MINUS_G, -2.0),
]


def build_tagger(folder: Path, size: int = 8) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(TAGS)
    x = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [1, size, size, 3])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [1, n])
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T  # (3, n)
    inits = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1 / 255.0], dtype=np.float32), "scale"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([t[3] for t in TAGS], dtype=np.float32), "b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["norm"]),
        helper.make_node("MatMul", ["norm", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(nodes, "tiny-wd-tagger", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder / "model.onnx", folder / "selected_tags.csv"

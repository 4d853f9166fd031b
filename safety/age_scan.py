"""Age estimation: an extra image scanner whose minor signal withholds any exposure for review.

It plugs into the image scan like every extra scanner (`extra_scanners` in
configs/safety/image_scan.yaml, path `safety.age_scan:AgeEstimator`); the model is an ONNX file the
operator provides (its path in `options.model_path`), run by onnxruntime on the CPU. The contract:

- input: one float32 tensor `(1, 3, size, size)`, the image resized to `size`², RGB in [0, 1], then
  `(x - mean) / std` per channel;
- output: `(1, 1)`, the estimated age in years of the youngest person shown, or `(1, 2)`, the
  probabilities `[adult, minor]`.

A minor signal (age under `minor_age`, or P(minor) at or above `minor_probability`) never raises the
image's level by itself; the policy withholds any image above PG that carries one and sends it to a
moderator. A model that cannot be loaded makes the configuration invalid at start, and an inference
error fails the scan closed, like every scanner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from safety.image_scan import Detection, ScannerOutput
from safety.levels import NsfwLevel


class AgeEstimator:
    name = "age"

    def __init__(self, model_path: str | Path, *, minor_age: float = 18.0, minor_probability: float = 0.5,
                 size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), threads: int = 1):
        import onnxruntime

        if not 0 < minor_probability < 1 or minor_age < 18:
            raise ValueError("minor_age must be at least 18 and minor_probability between 0 and 1")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.minor_age = minor_age
        self.minor_probability = minor_probability
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)

    def _input(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        return (x - self.mean) / self.std

    def scan(self, image: Image.Image) -> ScannerOutput:
        (out,) = self.session.run(None, {self.input_name: self._input(image)})
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.size == 1:
            age = float(out[0])
            minor, detection = age < self.minor_age, Detection("age_estimate", age, (), self.name, NsfwLevel.PG)
        elif out.size == 2:
            p_minor = float(out[1])
            minor = p_minor >= self.minor_probability
            detection = Detection("minor_probability", p_minor, (), self.name, NsfwLevel.PG)
        else:
            raise ValueError(f"age model output has {out.size} values; expected 1 (age) or 2 (adult, minor)")
        return ScannerOutput(NsfwLevel.PG, (detection,), minor)
